"""``sparsealign masks RUN``: an HTML page of the token masks of a SparsePO or MaPO run.

For ``n`` held-out pairs of the run, every response token of the chosen and the rejected response is
coloured by its reward-mask value and, on a second line, by its KL-mask value (the token-level figures of
the SparsePO paper). SparsePO masks come from the trained mask networks (``final/method_module.*``) applied
to the reference's hidden states; MaPO masks from the reference's activations. Only the reference model
is needed: masks are functions of the reference.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from sparsealign.config import Config
from sparsealign.data.collate import collate_pairs
from sparsealign.data.prepare import prepare_data
from sparsealign.errors import UserError
from sparsealign.methods import METHODS, MODULE_WEIGHTS, Method, Need, get_method, load_method_module
from sparsealign.models.loading import load_bundle
from sparsealign.models.logprobs import TokenModel, unwrap_causal_lm
from sparsealign.recipes.load import load_config
from sparsealign.train.step import reference_forward, step_inputs


def has_token_masks(method: Method) -> bool:
    """Methods whose loss weights tokens by a mask: a module on the reference's hidden states (SparsePO) or
    an activation mask (MaPO)."""
    learned = method.module is not None and Need.REFERENCE_LAYERS in method.needs
    return learned or Need.ACTIVATION_MASK in method.needs


def compute_masks(cfg: Config, run: Path, n: int) -> list[dict]:
    """Reward and KL mask values per response token for ``n`` evaluation pairs of the run."""
    method = get_method(cfg.method.name)
    if not has_token_masks(method):
        with_masks = ", ".join(name for name, m in METHODS.items() if has_token_masks(m))
        raise UserError(
            f"Run {run} trained with method '{cfg.method.name}', which has no token masks ({with_masks} do)."
        )
    bundle = load_bundle(cfg.model, cfg.train.seed, torch.device("cpu"), reference=cfg.reference)
    data = prepare_data(cfg, bundle)
    pairs = (data.eval or data.train)[:n]
    module = None
    if method.module is not None:
        final = run / "final"
        if not (final / MODULE_WEIGHTS).is_file():
            raise UserError(f"{final} has no {MODULE_WEIGHTS}: has the run finished?")
        module, _ = load_method_module(final, unwrap_causal_lm(bundle.policy).config)
    batch = collate_pairs(pairs, bundle.tokenizer.pad_token_id)
    inputs = step_inputs(cfg, method, bundle, batch, pairs)
    with torch.no_grad(), bundle.reference_model() as ref_model:
        token_model = TokenModel(ref_model, cfg.train.logprob_chunk, extra=module)
        ref = reference_forward(ref_model, token_model, inputs)
        if module is not None:
            reward, kl = module(ref.outputs, ref.outputs)
        else:
            reward = kl = ref.activation_mask
    rows = []
    b = len(pairs)
    for i, pair in enumerate(pairs):
        sides = {}
        for side, row, ids in (("chosen", i, pair.chosen_ids), ("rejected", b + i, pair.rejected_ids)):
            sides[side] = {
                "tokens": [bundle.tokenizer.decode([t]) for t in ids],
                "reward": reward[row, : len(ids)].tolist(),
                "kl": kl[row, : len(ids)].tolist(),
            }
        rows.append({"prompt": bundle.tokenizer.decode(pair.prompt_ids, skip_special_tokens=True), **sides})
    return rows


def _cells(tokens: list[str], values: list[float], top: float, colour: str) -> str:
    spans = []
    for token, value in zip(tokens, values, strict=True):
        alpha = 0.0 if top <= 0 else min(1.0, value / top)
        text = html.escape(token).replace("\n", "↵")
        spans.append(
            f'<span class="t" style="background: rgba({colour}, {alpha:.3f})" title="{value:.4f}">{text}</span>'
        )
    return "".join(spans)


def render(rows: list[dict], title: str) -> str:
    """A self-contained page; colour intensity is the mask value relative to the page's largest value."""
    top_reward = max((v for r in rows for s in ("chosen", "rejected") for v in r[s]["reward"]), default=0.0)
    top_kl = max((v for r in rows for s in ("chosen", "rejected") for v in r[s]["kl"]), default=0.0)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.9}",
        ".t{padding:1px 0;border-radius:2px;font-family:monospace;white-space:pre-wrap}",
        ".pair{border-top:1px solid #ccc;padding:.5em 0} .label{color:#555;font-size:.85em;width:9em;display:inline-block}",
        "</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Green: reward mask m<sub>u</sub> (max {top_reward:.3g}); blue: KL mask m<sub>d</sub> "
        f"(max {top_kl:.3g}). Hover a token for its value. Exact zeros are uncoloured.</p>",
    ]
    for i, row in enumerate(rows):
        parts.append(
            f"<div class='pair'><p><b>Pair {i + 1}</b> &mdash; prompt: <i>{html.escape(row['prompt'])}</i></p>"
        )
        for side in ("chosen", "rejected"):
            data = row[side]
            parts.append(
                f"<div><span class='label'>{side}, reward</span>{_cells(data['tokens'], data['reward'], top_reward, '0,160,60')}</div>"
            )
            parts.append(
                f"<div><span class='label'>{side}, KL</span>{_cells(data['tokens'], data['kl'], top_kl, '30,90,220')}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_masks_page(run: str | Path, n: int = 8) -> Path:
    """Compute the masks of ``n`` held-out pairs of the run folder ``run`` and write ``report/masks.html``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml).")
    cfg = load_config(run / "config.yaml")
    rows = compute_masks(cfg, run, n)
    out = run / "report" / "masks.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, f"Token masks: {cfg.method.name} ({run.name})"))
    return out
