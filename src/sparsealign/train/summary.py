"""The end-of-run summary ``sparsealign train`` prints: steps, time, throughput, the last training and
held-out metrics, the best held-out loss, and where everything was written."""

from __future__ import annotations

from sparsealign.train.loop import RunResult

# the metrics shown when present, in this order (others stay in metrics.jsonl)
TRAIN_SHOWN = ("loss", "rewards/accuracies", "rewards/margins")
EVAL_SHOWN = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")


def format_duration(seconds: float) -> str:
    """``42.3s``, ``3m 05s`` or ``2h 03m 05s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _line(label: str, text: str) -> str:
    return f"  {label + ':':13s}{text}"


def _metrics_line(label: str, metrics: dict[str, float], names: tuple[str, ...]) -> str | None:
    shown = [f"{name} {metrics[name]:.4f}" for name in names if isinstance(metrics.get(name), (int, float))]
    return _line(label, "  ".join(shown)) if shown else None


def format_run_summary(result: RunResult) -> str:
    """The summary as lines of text; the first is ``Done: N steps in TIME (T tokens/s); run folder DIR``."""
    speed = f" ({result.tokens_per_s:,.0f} tokens/s)" if result.tokens_per_s is not None else ""
    lines = [
        f"Done: {result.steps} steps in {format_duration(result.elapsed_s)}{speed}; "
        f"run folder {result.output_dir}"
    ]
    for line in (
        _metrics_line("train", result.final_metrics, TRAIN_SHOWN),
        _metrics_line("eval", result.eval_metrics, EVAL_SHOWN),
    ):
        if line is not None:
            lines.append(line)
    if result.best_eval_loss is not None:
        lines.append(
            _line("best eval", f"eval/loss {result.best_eval_loss:.4f} at step {result.best_eval_step}")
        )
    if result.report is not None and isinstance(result.report.get("reward_delta"), (int, float)):
        delta = result.report["reward_delta"]
        lines.append(_line("report", f"reward delta (policy - reference) {delta:+.4f}"))
    elif result.report is not None and isinstance(
        result.report.get("policy", {}).get("kl_mean"), (int, float)
    ):
        policy = result.report["policy"]
        text = (
            f"policy KL to reference {policy['kl_mean']:.4f}, mean length {policy['length_mean']:.1f} tokens"
        )
        lines.append(_line("report", text))
    written = dict(result.written)
    if result.report is not None:
        written.setdefault("report", result.output_dir / "report")
    for label, path in written.items():
        lines.append(_line(label, str(path)))
    return "\n".join(lines)
