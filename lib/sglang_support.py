"""SGLang helpers shared by the benchmark engine and the comparison capture run: the import and the acceptance
counters of one request's meta_info (sglang 0.5.x: spec_verify_ct, completion_tokens)."""
from __future__ import annotations

from lib.errors import EngineUnavailable
from lib.types import SpecCounters

INSTALL_HINT = ("sglang is not installed: on a machine with an NVIDIA GPU run scripts/ensure_env.sh sglang "
                "(requirements/sglang.txt); it has no CPU build")


def import_sglang():
    try:
        import sglang
    except ImportError:
        raise EngineUnavailable(INSTALL_HINT) from None
    return sglang


def spec_counters_from_meta(meta: dict, num_draft_tokens: int, emitted: int) -> SpecCounters | None:
    """One request's acceptance; None when SGLang verified nothing (no speculation).

    num_draft_tokens is the engine's speculative_num_draft_tokens: the nodes of each verified tree, root included.
    The root is the last verified token, so every verification checks num_draft_tokens - 1 drafts (SGLang's own
    spec_accept_rate counts so) and emits its accepted drafts plus one target token. `emitted` (the output's
    length) stands in for completion_tokens when meta_info lacks it.
    """
    verify = int(meta.get("spec_verify_ct", 0) or 0)
    if not verify:
        return None
    completion = int(meta.get("completion_tokens", emitted))
    return SpecCounters(num_drafts=verify, draft_tokens=verify * (num_draft_tokens - 1),
                        accepted_tokens=completion - verify)
