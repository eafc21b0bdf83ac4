"""Built-in techniques. Importing this package registers them by name for configs."""

from framework.techniques.activation_stats import ActivationStats, activation_stats
from framework.techniques.best_model import BestModel
from framework.diagnosis import first_nonfinite_layer, out_of_memory_report  # (were the doctor's; shared now)
from framework.techniques.doctor import Doctor
from framework.techniques.early_stopping import EarlyStopping
from framework.techniques.ema import EMA, ema_decay, ema_update_
from framework.techniques.grad_centralization import GradientCentralization, centralize_gradients_
from framework.techniques.grad_checkpointing import GradientCheckpointing
from framework.techniques.grad_clipping import GradientClipping
from framework.techniques.gan_samples import GANSamples, classifier_judge
from framework.techniques.gradient_flow import GradientFlow, gradient_flow
from framework.techniques.gradient_penalty import GradientPenalty, gradient_penalty
from framework.techniques.hf_export import HFExport
from framework.techniques.layerwise_lr import LayerwiseLR, parameter_groups
from framework.techniques.label_smoothing import LabelSmoothing, smooth_targets
from framework.techniques.lookahead import Lookahead, lookahead_sync_
from framework.optim import scale_learning_rates_  # (was nan_guard's; rollbacks now go through the loop)
from framework.techniques.nan_guard import NaNGuard
from framework.techniques.mixup import (
    CutMix,
    Mixup,
    cutmix_batch,
    cutmix_box,
    mix_batch,
    mixup_batch,
    one_hot_targets,
    sample_lambda,
)
from framework.techniques.profiler import Profiler
from framework.techniques.progressive_resizing import ProgressiveResizing, progressive_size
from framework.techniques.sam import SAM, sam_perturbation, sam_step
from framework.techniques.text_sample import TextSample, sample_text
from framework.techniques.stochastic_depth import StochasticDepth, depth_rates
from framework.techniques.lr_schedule import (
    CosineLR,
    CosineRestartsLR,
    ExponentialLR,
    LRSchedule,
    MultiStepLR,
    OneCycleLR,
    PlateauLR,
    StepLR,
    schedule_lrs,
)

__all__ = [
    "EMA", "BestModel", "EarlyStopping", "GradientCentralization", "Lookahead", "centralize_gradients_",
    "lookahead_sync_", "SAM", "sam_perturbation", "LayerwiseLR", "parameter_groups", "CosineLR", "CosineRestartsLR", "ExponentialLR", "GradientClipping", "LRSchedule", "MultiStepLR",
    "OneCycleLR", "PlateauLR", "StepLR", "ema_update_", "ema_decay", "schedule_lrs",
    "LabelSmoothing", "smooth_targets", "Mixup", "CutMix", "mixup_batch", "cutmix_box", "cutmix_batch",
    "one_hot_targets", "mix_batch", "sample_lambda", "sam_step",
    "StochasticDepth", "depth_rates", "ProgressiveResizing", "progressive_size",
    "GradientCheckpointing",
    "ActivationStats", "activation_stats", "GradientFlow", "gradient_flow", "Profiler",
    "TextSample", "sample_text", "HFExport", "GradientPenalty", "gradient_penalty", "GANSamples", "classifier_judge",
    "NaNGuard", "scale_learning_rates_",
    "Doctor", "first_nonfinite_layer", "out_of_memory_report",
]
