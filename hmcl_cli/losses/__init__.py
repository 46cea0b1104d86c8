"""The HMCL objective and its three terms (each usable alone)."""

from hmcl_cli.losses.batch import PairBatch
from hmcl_cli.losses.classification import LinearPairClassificationLoss, OrdinalClassificationLoss
from hmcl_cli.losses.contrastive import GradedInfoNCELoss
from hmcl_cli.losses.hmcl import HMCLLoss
from hmcl_cli.losses.local import SegmentInfoNCELoss
from hmcl_cli.losses.ranking import GradedCoSENTLoss

__all__ = ["PairBatch", "GradedInfoNCELoss", "OrdinalClassificationLoss", "LinearPairClassificationLoss",
           "GradedCoSENTLoss", "SegmentInfoNCELoss", "HMCLLoss"]
