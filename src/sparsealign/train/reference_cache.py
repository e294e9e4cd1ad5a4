"""``sparsealign cache``: run the reference once over a recipe's data and store what the method needs of it
(``sparsealign.refcache``), so that training runs no reference model."""

from __future__ import annotations

import logging
from pathlib import Path

from sparsealign.config import Config
from sparsealign.errors import CacheError
from sparsealign.methods import Need, cache_can_serve, cacheable_methods, get_method
from sparsealign.refcache.build import build_cache
from sparsealign.refcache.identity import run_identity
from sparsealign.refcache.store import SPLITS, ReferenceCache, split_file
from sparsealign.train.step import prepare_method_data, sae_pooling

logger = logging.getLogger("sparsealign.refcache")


def cache_run(cfg: Config, force: bool = False) -> tuple[Path, bool]:
    """Build the reference cache of a recipe's train and eval pairs.

    The cache goes to ``reference.cache`` (default ``<output_dir>/reference-cache``). An up-to-date cache is
    left as it is; one that does not match the recipe is refused unless ``force``. Returns the folder and
    whether anything was built."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from sparsealign.models.digest import weights_digest
    from sparsealign.models.loading import load_bundle
    from sparsealign.models.logprobs import unwrap_causal_lm
    from sparsealign.sae.probe import build_feature_probe
    from sparsealign.train.precision import resolve_precision, training_model_config

    method = get_method(cfg.method.name)
    if not cache_can_serve(method):
        raise CacheError(
            f"Method '{cfg.method.name}' does not train from a reference cache; "
            f"methods that do: {', '.join(cacheable_methods())}."
        )
    if cfg.reference.cache is None:
        cfg.reference.cache = str(Path(cfg.output_dir) / "reference-cache")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() reads it
    device = state.device
    precision = resolve_precision(cfg.train.precision, device, cfg.model.dtype)
    model_cfg = training_model_config(cfg.model, precision)  # the weights training will load: same digest
    bundle = load_bundle(model_cfg, cfg.train.seed, device, need_reference=False, reference=cfg.reference)
    digest = weights_digest(unwrap_causal_lm(bundle.policy))
    with state.main_process_first():  # sampled pairs (imdb) are made once, by the main process
        data = prepare_method_data(cfg, method, bundle, state.is_main_process)
    probe = None
    if Need.SAE_FEATURES in method.needs:
        probe = build_feature_probe(cfg.sae, bundle.policy, device, sae_pooling(method, cfg))
    expected = run_identity(cfg, bundle, probe, digest)
    folder = Path(cfg.reference.cache)
    if not force and all(split_file(folder, s).is_file() for s in SPLITS):
        cache = ReferenceCache(folder, expected)  # raises, naming the mismatch, if it is stale
        if not cache.missing([*data.train, *data.eval]):
            logger.info("reference cache: %s is up to date (%d pairs)", folder, len(cache))
            return folder, False
    build_cache(cfg, bundle, {"train": data.train, "eval": data.eval}, probe, expected, device)
    return folder, True
