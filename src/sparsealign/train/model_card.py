"""The model card of a run: ``<run>/final/README.md``, in the Hugging Face hub's format.

The card is a YAML front matter block (``huggingface_hub.ModelCardData``: ``library_name``, ``base_model``,
``datasets``, ``tags``, ``pipeline_tag``) followed by Markdown: the base model, the method with its options,
the data, the headline metrics (the last training and held-out lines of ``metrics.jsonl``, and the sampled
reward and KL of ``report/summary.json`` when the run has one), the command that reproduces the run with
its resolved configuration, and the citation of the method's paper (the method record's ``citation``).

It is written from the run folder alone (``config.yaml``, ``metrics.jsonl``, ``report/``), so the loop
writes it after the final save and ``sparsealign push`` can write it for a run that has none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from sparsealign.io import atomic_write
from sparsealign.methods import Method, get_method
from sparsealign.models.builtins import BUILTIN_MODELS, SMOLLM2_HUB_ID, SMOLLM2_NAME

__all__ = ["CARD_FILE", "last_metrics", "model_card_text", "write_model_card"]

CARD_FILE = "README.md"
HEADLINE = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
"""Training metrics shown on the card when the method logs them (every held-out ``eval/*`` one is shown)."""
REPORT_STATS = ("reward_mean", "kl_mean", "length_mean", "positive_fraction")


def hub_model_id(name: str) -> str | None:
    """The hub id of a model name when it has one: a built-in's (only ``smollm2-135m-instruct``), or the name
    itself when it looks like ``owner/model`` and is no local folder; None for random built-ins and folders."""
    if name == SMOLLM2_NAME:
        return SMOLLM2_HUB_ID
    if name in BUILTIN_MODELS or Path(name).exists():
        return None
    parts = name.split("/")
    return name if len(parts) == 2 and all(parts) else None


def last_metrics(path: Path) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """``(step, train, eval)``: the last logged step, and the last ``metrics.jsonl`` line with training
    metrics (``loss``) and with held-out ones (``eval/*``); empty dicts when there are none."""
    step, train, held_out = 0, {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            step = max(step, int(record.get("step", 0)))
            if "loss" in record:
                train = record
            if any(key.startswith("eval/") for key in record):
                held_out = record
    return step, train, held_out


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _data_line(data: dict[str, Any]) -> str:
    if data.get("source"):
        return f"the built-in source `{data['source']}`"
    if data.get("dataset"):
        return f"the dataset `{data['dataset']}` (split `{data.get('split', 'train')}`)"
    if data.get("path"):
        return f"the file `{Path(data['path']).name}`"
    return "the recipe's default data"


def _front_matter(config: dict[str, Any], method: Method, adapter: bool) -> str:
    from huggingface_hub import ModelCardData

    data = config.get("data", {})
    dataset = data.get("dataset")
    datasets = [dataset] if dataset and hub_model_id(dataset) else None  # a hub id, not a local folder
    tags = ["sparsealign", method.name, "preference-optimization", *(["lora"] if adapter else [])]
    card_data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=hub_model_id(config["model"]["name"]),
        datasets=datasets,
        tags=tags,
        pipeline_tag="text-generation",
    )
    return card_data.to_yaml()


def _citation_block(citation: str) -> list[str]:
    if not citation:
        return ["The method has no paper to cite."]
    if citation.lstrip().startswith("@"):
        return ["```bibtex", citation.strip(), "```"]
    return [citation]


def model_card_text(
    config: dict[str, Any],
    method: Method,
    step: int,
    train: dict[str, Any],
    held_out: dict[str, Any],
    report: dict[str, Any] | None = None,
    adapter: bool = False,
    config_path: str = "config.yaml",
) -> str:
    """The card's text (front matter and Markdown) from the resolved config tree (as in ``config.yaml``), the
    method record, the last step and metrics (see :func:`last_metrics`) and the report summary if any."""
    model = config["model"]
    options = {k: v for k, v in config["method"].items() if k != "name"}
    kind = "LoRA adapter" if adapter else "model"
    lines = [
        "---",
        _front_matter(config, method, adapter),
        "---",
        "",
        f"# {Path(config.get('output_dir', 'run')).name}",
        "",
        f"A {kind} trained with sparsealign using **{method.name}**"
        f" ({method.summary or method.name}) for {step} optimizer steps.",
        "",
        f"- **Base model:** `{model['name']}`"
        + (f" (revision `{model['revision']}`)" if model.get("revision") else ""),
        f"- **Method:** `{method.name}` with "
        + (", ".join(f"`{k}={v}`" for k, v in options.items()) if options else "its defaults"),
        f"- **Data:** {_data_line(config.get('data', {}))}",
    ]
    if adapter:
        lines.append(
            "- **Loading:** `AutoPeftModelForCausalLM.from_pretrained(<this folder or repo>)` "
            "(`peft` loads the base model recorded in `adapter_config.json`)."
        )
    else:
        lines.append("- **Loading:** `AutoModelForCausalLM.from_pretrained(<this folder or repo>)`.")
    lines += ["", "## Metrics", ""]
    rows = [(k, train[k]) for k in HEADLINE if k in train]
    rows += sorted((k, v) for k, v in held_out.items() if k.startswith("eval/"))
    if report:
        for side in ("policy", "reference"):
            rows += [
                (f"report/{side}/{k}", report[side][k]) for k in REPORT_STATS if k in report.get(side, {})
            ]
        if "reward_delta" in report:
            rows.append(("report/reward_delta", report["reward_delta"]))
    if rows:
        lines += [f"At step {step} (the last logged values):", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{name}` | {_number(value)} |" for name, value in rows]
    else:
        lines.append("No metrics were logged.")
    resolved = yaml.safe_dump(config, sort_keys=False).rstrip()
    lines += [
        "",
        "## Reproduce",
        "",
        f"With the run's resolved configuration (`{config_path}`, repeated below):",
        "",
        "```bash",
        f"sparsealign train {config_path}",
        "```",
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        resolved,
        "```",
        "",
        "</details>",
        "",
        "## Citation",
        "",
        *_citation_block(method.citation),
        "",
    ]
    return "\n".join(lines)


def write_model_card(run: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write ``<run>/final/README.md`` from the run folder; ``config`` defaults to ``<run>/config.yaml``."""
    run = Path(run)
    final = run / "final"
    if config is None:
        config = yaml.safe_load((run / "config.yaml").read_text())
    step, train, held_out = last_metrics(run / "metrics.jsonl")
    summary = run / "report" / "summary.json"
    report = json.loads(summary.read_text()) if summary.is_file() else None
    text = model_card_text(
        config,
        get_method(config["method"]["name"]),
        step,
        train,
        held_out,
        report,
        adapter=(final / "adapter_config.json").is_file(),
        config_path=str(run / "config.yaml"),
    )
    with atomic_write(final / CARD_FILE) as handle:
        handle.write(text)
    return final / CARD_FILE
