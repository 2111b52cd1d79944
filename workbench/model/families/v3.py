"""DeepSeek-V3 (and R1, V3.1): V2's layers with sigmoid scores, `noaux_tc` routing and the balancing bias.

The layer assembly is V2's (MLA + dense MLP or MoE); what V3 changes lives in its config and the shared blocks:
sigmoid scoring, groups scored by the sum of their two best experts, and `e_score_correction_bias` (the
auxiliary-loss-free balancing bias, used for selection only), which the gate keeps whenever `topk_method` is
`noaux_tc`. Multi-token-prediction layers are not part of the model (the checkpoint reader skips them).
"""

from __future__ import annotations

from workbench.model.families.v2 import build_block

SUMMARY = "V2's layers; sigmoid gate, noaux_tc with e_score_correction_bias"

__all__ = ["SUMMARY", "build_block"]
