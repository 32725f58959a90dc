"""Training of every part (AE, IKR/CKG denoisers, MKF) through the one shared loop in `loop`."""

from magicfuse.training.ae import AETrainConfig, train_autoencoder
from magicfuse.training.ldm import LDMTrainConfig, evaluate_ldm_psnr, train_ldm
from magicfuse.training.loop import TrainConfig, TrainJob, TrainResult, run_training
from magicfuse.training.mkf import MKFTrainConfig, train_mkf

__all__ = [
    "AETrainConfig",
    "LDMTrainConfig",
    "MKFTrainConfig",
    "TrainConfig",
    "TrainJob",
    "TrainResult",
    "evaluate_ldm_psnr",
    "run_training",
    "train_autoencoder",
    "train_ldm",
    "train_mkf",
]
