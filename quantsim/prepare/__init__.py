"""Get a float model ready for quantization simulation.

* :func:`prepare_model`: functional ops -> modules, attention decomposed, reused modules
  un-shared (torch.fx, with per-submodule fallback);
* :func:`fold_all_batch_norms`: fold BatchNorm into the preceding conv / linear layer;
* :func:`fuse_all_conv_bn`: replace conv-BN(-ReLU) chains by fused QAT modules;
* :class:`ModelValidator`: report what would stay unquantized or what the QAT layers refuse.
"""
from quantsim.prepare.batch_norm_fold import (
    find_conv_bn_pairs,
    fold_all_batch_norms,
    fuse_all_conv_bn,
)
from quantsim.prepare.balance import BalanceReport, apply_balance_record, balance_activations
from quantsim.prepare.preparer import PrepareReport, prepare_model
from quantsim.prepare.validator import Finding, ModelValidator, ValidationResult

__all__ = ["balance_activations", "apply_balance_record", "BalanceReport", "prepare_model", "PrepareReport", "fold_all_batch_norms", "fuse_all_conv_bn",
           "find_conv_bn_pairs", "ModelValidator", "ValidationResult", "Finding"]
