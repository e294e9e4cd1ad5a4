"""Named sources for the public datasets the SparsePO and FPO papers train and evaluate on.

One module per dataset family; each registers its sources on import (``data.source=NAME``, see
:data:`sparsealign.data.sources.BUILTIN_SOURCE_MODULES`): ``hh``, ``hh-helpful``, ``hh-harmless`` (:mod:`.hh`),
``shp`` (:mod:`.shp`), ``oasst`` (:mod:`.oasst`), ``ultrafeedback`` (:mod:`.ultrafeedback`), ``ultrachat``
(:mod:`.ultrachat`), ``tldr`` and ``tldr-sft`` (:mod:`.tldr`), ``imdb-hub`` (:mod:`.imdb_hub`), ``mbpp``
(:mod:`.mbpp`), ``alpacaeval`` and ``arenahard`` (:mod:`.prompts`), and ``mix`` (:mod:`.mix`). docs/data.md
lists each schema and what is kept and dropped.
"""
