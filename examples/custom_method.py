"""A user-defined method, trained without touching sparsealign's source:

    sparsealign train smoke method.name=examples/custom_method.py:my_method method.margin=0.5

``my_method`` is a hinge loss on the DPO log-ratio margin (SLiC-style calibration against the reference):
    loss = mean over pairs of max(0, margin − β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))])
with summed log-probs. It needs the reference's log-probs, so a reference cache can serve it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsealign.losses import LossOutput, masked_sum, paired_metrics
from sparsealign.methods import Method, MethodOptions, Need, StepOutputs, option


@dataclass
class MyOptions(MethodOptions):
    beta: float = option("Scale of the log-ratio margin.", 0.1)
    margin: float = option("Hinge margin: pairs whose scaled margin exceeds it contribute nothing.", 1.0)


def hinge_margin_loss(out: StepOutputs, options: MyOptions) -> LossOutput:
    (pc, pr), (rc, rr) = out.policy_pair(), out.reference_pair()
    chosen = options.beta * masked_sum(pc.logps - rc.logps, pc.mask)
    rejected = options.beta * masked_sum(pr.logps - rr.logps, pr.mask)
    per_pair = torch.relu(options.margin - (chosen - rejected))
    metrics = paired_metrics(chosen, rejected, masked_sum(pc.logps, pc.mask), masked_sum(pr.logps, pr.mask))
    return LossOutput(per_pair.mean(), per_pair, metrics)


my_method = Method(
    "my_method",
    hinge_margin_loss,
    MyOptions,
    needs={Need.REFERENCE_LOGPS},
    summary="hinge loss on the DPO margin (an example of a user-defined method)",
)
