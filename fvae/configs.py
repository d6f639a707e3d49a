"""The base config every experiment starts from, and its validation.

Experiment files in `experiments/` call `get_base_config()` and change only what
differs. The returned config is locked: assigning a key that does not exist raises at
once, so a typo in an experiment file or on the command line cannot be silently
ignored. `validate` checks values before any data is loaded or any step is run.
"""

from __future__ import annotations

import importlib.util
import math
import re
import os
import pathlib

import ml_collections
from ml_collections import config_dict

LIKELIHOODS = ("bce", "mse", "continuous_bernoulli", "gaussian", "discretized_logistic")
GAUSSIAN_VARIANCES = ("learned", "optimal")
DECODER_SCALES = ("none", "shared", "per_pixel")
REDUCTIONS = ("sum", "mean")
MODELS = ("conv", "keras")
BETA_SCHEDULES = ("constant", "linear", "cyclical")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")
DATA_SOURCES = ("idx", "tfds")
BINARIZE_MODES = ("none", "dynamic")
CROSS_DEVICE_REDUCES = ("auto", "host", "xla")  # see fvae.parallel
CPU_CONVOLUTIONS = ("eigen", "xla_default")  # see fvae/cpu/process.py
CPU_CONV3X3 = ("fvae", "xla")  # see fvae/cpu/__init__.py


# What may change when a run resumes follows from the block: how to compute (runtime),
# report, save or evaluate, not what is trained. Beyond them only the run's name and
# where the data comes from (its checksums are checked, whatever the path).
RESUMABLE_BLOCKS = ("runtime", "report", "logging", "checkpoint", "eval")
RESUMABLE_KEYS = ("name", "data.dir", "data.download", "data.verify_checksums",
                  # what a run does about a non-finite step: steps that were finite
                  # compute the same either way (see train.check_finite)
                  "train.on_nonfinite", "train.max_skipped_fraction")
# Keys an earlier fvae had, and where they live now (for the error an old command gets).
MOVED_KEYS = {**{f"train.{k}": f"runtime.{k}" for k in (
    "num_devices", "steps_per_dispatch", "cross_device_reduce", "cpu_devices",
    "cpu_convolutions", "cpu_conv3x3", "huge_pages", "eval_batch_size")},
    **{f"train.{k}": f"report.{k}" for k in (
        "log_every_steps", "progress_bar", "num_figure_images", "epoch_metrics_images")},
    "train.tensorboard": "logging.writers", "report.tensorboard": "logging.writers"}
# How a moved key's old value reads in its new home, where the value changed shape.
MOVED_VALUES = {"logging.writers": lambda on: ("tensorboard",) if on else ()}
WRITERS = ("tensorboard", "wandb", "mlflow")  # fvae/writer.py; the extras they need:
WRITER_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"),
                   "wandb": ("wandb", "fvae[wandb]"), "mlflow": ("mlflow", "fvae[mlflow]")}
# The length of training: resumable (a longer run extends a shorter one) unless a
# schedule is shaped by it.
LENGTH_KEYS = ("train.num_epochs", "train.num_steps")
# The keys that define the trained model itself: what evaluating a checkpoint needs.
MODEL_PREFIXES = ("model.", "loss.", "data.binarize")


def is_resumable(key: str) -> bool:
    """Whether a dotted key may differ between a run and its resumption."""
    return key in RESUMABLE_KEYS or key.split(".", 1)[0] in RESUMABLE_BLOCKS


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and the fix."""


def get_base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment: the study's high-capacity VAE with BCE."""
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.source = "idx"  # 'idx' (the four original .gz files) or 'tfds'
    c.data.dir = config_dict.placeholder(str)  # None: $FVAE_DATA_DIR or ~/.cache/fvae
    c.data.download = True  # fetch missing files from the official source
    c.data.verify_checksums = True  # check the published md5 of each file
    # Training images held out to select the best checkpoint (never trained on): a fixed
    # split (data.VALIDATION_SEED), the same for every run of the same size, taken
    # before data.limit_train applies to the rest.
    c.data.validation_size = 5000
    c.data.limit_train = 0  # >0: use only the first N remaining training images
    c.data.limit_test = 0  # >0: use only the first N test images
    # 'dynamic': train on fresh Bernoulli(pixel/255) draws every step and evaluate on
    # one fixed binarisation of the test set (fvae.binarize), as published tables do.
    c.data.binarize = "none"

    c.model = ml_collections.ConfigDict()
    c.model.name = "conv"  # 'conv' (the study's model) or 'keras' (the small one)
    c.model.latent_dim = 32
    c.model.encoder_widths = (32, 64, 128)
    c.model.encoder_strides = (2, 2, 1)
    c.model.encoder_dense = 256
    c.model.decoder_widths = (128, 64, 32)  # Dense(7*7*w0), then upsample to w1, w2
    c.model.num_res_blocks = 2
    # How the stride-2 transposed convs are computed: 'subpixel' (exactly
    # nn.ConvTranspose, faster), 'conv_transpose' (flax's own) or 'pixel_shuffle' (a
    # free 2x2 conv + depth-to-space: a slightly larger function class, not the study's).
    c.model.upsample = "subpixel"
    # A log-scale channel for likelihoods that need one: 'none', 'shared' (one learned
    # scalar for all pixels: gaussian with learned variance, the sigma-VAE) or
    # 'per_pixel' (a second decoder output: discretized_logistic). It must match the
    # likelihood (validate says which); 'none' keeps the one-logit decoder exactly.
    c.model.decoder_scale = "none"

    c.loss = ml_collections.ConfigDict()
    # 'bce' (Bernoulli), 'mse', 'continuous_bernoulli', 'gaussian' (sigma-VAE) or
    # 'discretized_logistic' (256 bins, bits per dimension); see fvae/losses.py.
    c.loss.likelihood = "bce"
    c.loss.reduction = "sum"  # for mse: 'sum' or 'mean' over pixels; others sum
    # gaussian: 'optimal' (sigma^2 = the batch's MSE, no parameter) or 'learned' (one
    # log sigma learned by the decoder; needs model.decoder_scale='shared').
    c.loss.gaussian_variance = "optimal"
    c.loss.beta = 1.0
    c.loss.beta_schedule = "constant"  # 'constant', 'linear' or 'cyclical'
    c.loss.beta_start = 0.0  # first value of a linear or cyclical schedule
    c.loss.warmup_steps = 0  # linear: steps to reach beta
    c.loss.warmup_epochs = 0.0  # alternative to warmup_steps, in epochs
    c.loss.cycle_steps = 0  # cyclical: length of one cycle (0: a quarter of training)
    c.loss.cycle_ratio = 0.5  # cyclical: fraction of a cycle spent ramping up

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.learning_rate = 1e-3
    c.optim.lr_schedule = "constant"  # 'constant', 'cosine' or 'warmup_cosine'
    c.optim.lr_warmup_steps = 0
    c.optim.weight_decay = 0.0  # adamw only
    c.optim.grad_clip_norm = 0.0  # >0: clip gradients by global norm

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128
    c.train.num_epochs = 10
    c.train.num_steps = 0  # >0: train this many steps instead of num_epochs
    c.train.on_nonfinite = "stop"  # 'stop' with an error, or 'skip' the step and count it
    c.train.max_skipped_fraction = 0.25  # 'skip': stop after an epoch skipping more (1: never)

    # What a run reports while it trains; every key here may change when it resumes.
    c.report = ml_collections.ConfigDict()
    c.report.log_every_steps = 50  # progress-bar refresh
    c.report.progress_bar = True
    c.report.num_figure_images = 16  # per figure, at the end of training; 0: no figures
    # (`launch.py --mode plot` draws them from the checkpoint later)
    c.report.epoch_test_metrics = False  # also log test-set lines each epoch (they never
    # select anything; `launch.py --mode eval` reports the test set once, at the end)
    c.report.epoch_metrics_images = 1000  # images for per-epoch SSIM etc.; 0: off

    # How to compute, not what: the machine settings. Every key here may change when a
    # run resumes.
    c.runtime = ml_collections.ConfigDict()
    c.runtime.eval_batch_size = 1000  # test images per evaluation call
    c.runtime.num_devices = 0  # devices to split each batch over; 0: all
    c.runtime.steps_per_dispatch = 0  # steps per compiled call; 0: per-platform default
    c.runtime.cross_device_reduce = "auto"  # gradient sum across devices: 'host' (the CPU
    # runtime copies them), 'xla' (an all-reduce), 'auto': host on CPU in one process
    c.runtime.cpu_devices = 1  # CPU devices to ask XLA for; 0: up to one per core that
    # the batch sizes divide (one device uses every core with Eigen convolutions)
    c.runtime.cpu_convolutions = "eigen"  # XLA:CPU's convolution kernels: 'eigen' (multi-
    # threaded) or 'xla_default' (YNNPACK on jaxlib 0.10); see fvae.cpu
    c.runtime.cpu_conv3x3 = "fvae"  # 3x3 convs (stride 1, and the stride-2 transposed
    # ones) and their gradients on CPU: 'fvae' (its own kernels, compiled on first use)
    # or 'xla'; see fvae.cpu
    c.runtime.huge_pages = True  # glibc's malloc asks for transparent huge pages (Linux;
    # launch.py restarts itself once to set it); see fvae.cpu

    # Experiment trackers beside workdir/metrics.jsonl (which is always written).
    c.logging = ml_collections.ConfigDict()
    c.logging.writers = ("tensorboard",)  # any of 'tensorboard', 'wandb', 'mlflow'
    c.logging.wandb_project = "fvae"
    c.logging.wandb_mode = "online"  # or 'offline': files in workdir/wandb (`wandb sync`)
    c.logging.mlflow_experiment = "fvae"
    c.logging.mlflow_tracking_uri = config_dict.placeholder(str)  # None: workdir/mlruns

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.enabled = True
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch (and of training)
    c.checkpoint.keep = 3  # latest checkpoints kept; the best by validation ELBO apart
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()  # fvae.evaluate (launch.py --mode eval)
    c.eval.iwae_samples = 5000  # K importance samples per test image (Burda et al.)
    c.eval.iwae_num_images = 0  # >0: the IWAE bound on the first N test images only
    c.eval.iwae_decode_batch = 0  # decoder inputs per compiled step; 0: 256 CPU, 4096 else
    c.eval.elbo_samples = 1  # posterior draws per test image for nll_recon
    c.eval.fd_num_samples = 0  # prior samples for fd_samples; 0: one per test image
    c.eval.classifier_dir = config_dict.placeholder(str)  # None: ~/.cache/fvae/classifier
    c.eval.classifier_epochs = 3
    c.eval.probe_steps = 200  # L-BFGS steps of the logistic-regression probe
    c.eval.probe_l2 = 1e-4
    c.eval.seed = 0  # posterior and prior draws of the evaluation

    return c.lock()


def from_dict(saved: dict) -> ml_collections.ConfigDict:
    """A config saved as JSON (config.json, a checkpoint) on top of the base config, so
    keys added to fvae since the run was trained take their defaults. Lists that the
    base config holds as tuples become tuples again; unknown keys are an error."""
    config = get_base_config()

    def fill(target: ml_collections.ConfigDict, source: dict, prefix: str) -> None:
        for key, value in source.items():
            if f"{prefix}{key}" in MOVED_KEYS:  # saved by an earlier fvae: where it is now
                new = MOVED_KEYS[f"{prefix}{key}"]
                set_key(config, new, MOVED_VALUES.get(new, lambda v: v)(value))
                continue
            if key not in target:
                raise ConfigError(f"saved config key {prefix}{key} is unknown to this "
                                  "version of fvae; was the run made by a newer one?")
            if isinstance(target[key], ml_collections.ConfigDict):
                fill(target[key], value, f"{prefix}{key}.")
            elif isinstance(target[key], tuple):
                target[key] = tuple(value)
            else:
                target[key] = value

    fill(config, saved, "")
    return config


def packaged_experiments() -> dict[str, pathlib.Path]:
    """The experiment files fvae ships, by name: the repository's experiments/,
    installed as the package fvae.experiments (pyproject.toml)."""
    import importlib.resources
    try:
        root = importlib.resources.files("fvae.experiments")
    except ModuleNotFoundError:  # (a checkout run without installing it)
        return {}
    return {p.name[:-3]: pathlib.Path(str(p)) for p in sorted(root.iterdir(), key=str)
            if p.name.endswith(".py") and not p.name.startswith("_")}


def experiment_path(name: str | os.PathLike) -> pathlib.Path:
    """An experiment file: `name` if it is one, else the packaged experiment of that
    name ('sharp_bce', or 'experiments/sharp_bce.py' outside the repository)."""
    path = pathlib.Path(name)
    if path.is_file():
        return path
    shipped = packaged_experiments()
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    if path.parent.name in ("", "experiments") and stem in shipped:
        return shipped[stem]
    raise ConfigError(f"config file {str(name)!r} does not exist, and fvae ships no experiment "
                      f"of that name. Give a path, or one of: {', '.join(shipped) or '(none)'}.")


def resolve_config_flag(argv: list[str], flag: str = "config") -> list[str]:
    """argv with `--config NAME[:preset]` (or --config=...) naming its file's path."""
    out, i = list(argv), 1
    while i < len(out):
        arg = out[i]
        if arg in (f"--{flag}", f"-{flag}") and i + 1 < len(out):
            out[i + 1], i = _resolved(out[i + 1]), i + 1
        elif arg.startswith((f"--{flag}=", f"-{flag}=")):
            head, value = arg.split("=", 1)
            out[i] = f"{head}={_resolved(value)}"
        i += 1
    return out


def _resolved(value: str) -> str:
    name, colon, preset = value.partition(":")
    return f"{experiment_path(name)}{colon}{preset}"


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Runs an experiment file's get_config() (what --config does on the command line)."""
    spec = importlib.util.spec_from_file_location("fvae_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _fail(key: str, value, expected: str) -> None:
    raise ConfigError(f"config.{key}={value!r} is invalid: expected {expected}. "
                      f"Fix it in the experiment file or override with --config.{key}=...")


def _check_in(config, key: str, choices) -> None:
    value = get_key(config, key)
    if value not in choices:
        _fail(key, value, f"one of {', '.join(map(repr, choices))}")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (NaN would pass every comparison's negation)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_min(config, key: str, minimum, integer: bool = False) -> None:
    value = get_key(config, key)
    if integer and not _is_integer(value):
        _fail(key, value, f"an integer >= {minimum}")
    if not _is_number(value) or value < minimum:
        _fail(key, value, f"a finite number >= {minimum}")


def get_key(config, key: str):
    """config['train.batch_size'] for a dotted key."""
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def set_key(config: ml_collections.ConfigDict, key: str, value) -> None:
    """Sets a dotted key; a list given for a tuple-valued key becomes a tuple."""
    *path, last = key.split(".")
    node = get_key(config, ".".join(path)) if path else config
    node[last] = tuple(value) if isinstance(node[last], tuple) else value


def flatten(tree, prefix: str = "") -> dict:
    """{'train': {'num_epochs': 4}} -> {'train.num_epochs': 4}, for a dict or ConfigDict;
    tuples become lists, as they are in config.json."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def decoder_scales_for(loss_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The model.decoder_scale values the likelihood can use: a log-scale channel for
    the discretized logistic and the learned-variance Gaussian, none for the others."""
    if loss_config.likelihood == "discretized_logistic" or (
            loss_config.likelihood == "gaussian" and loss_config.gaussian_variance == "learned"):
        return ("shared", "per_pixel")
    return ("none",)


def check_keys(keys) -> None:
    """Raises ConfigError for keys the base config lacks, naming where a moved one went."""
    unknown = sorted(set(keys) - set(flatten(get_base_config())))
    if not unknown:
        return
    moved = [f"{k} is now {MOVED_KEYS[k]}" for k in unknown if k in MOVED_KEYS]
    raise ConfigError(f"unknown config key(s): {', '.join(unknown)}. " + (
        f"Moved: {'; '.join(moved)}." if moved else
        "Check the spelling against fvae/configs.py:get_base_config()."))


def check_override_flags(argv: list[str], flag: str = "config") -> None:
    """Raises ConfigError for a `--config.KEY=...` override of a key the base config
    lacks, before the flags are parsed (ml_collections would raise a bare traceback)."""
    override = re.compile(rf"^--?(?:no)?{flag}\.([^=]+)")
    check_keys(m.group(1) for m in map(override.match, argv) if m)


# The values validate has passed in this process (as sorted JSON), so that a config is
# checked once: by whoever made it (launch.py, the sweep), and not again by train.
_VALIDATED: set[str] = set()


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Raises ConfigError naming the first bad key; returns the config unchanged."""
    check_keys(flatten(config))
    for check in (_validate_data_and_model, _validate_loss, _validate_optim,
                  _validate_train_and_runtime, _validate_checkpoint_and_eval):
        check(config)
    _VALIDATED.add(config.to_json(sort_keys=True))
    return config


def ensure_valid(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """validate(config), unless this very value has passed validate already. What train
    calls: a config made by launch.py or a sweep is not checked twice, and one a library
    caller built, or changed after validating it, is checked before any work."""
    if config.to_json(sort_keys=True) not in _VALIDATED:
        validate(config)
    return config


def _validate_data_and_model(config: ml_collections.ConfigDict) -> None:
    """The data and model blocks."""
    _check_in(config, "data.source", DATA_SOURCES)
    _check_min(config, "data.validation_size", 1, integer=True)
    _check_min(config, "data.limit_train", 0, integer=True)
    _check_min(config, "data.limit_test", 0, integer=True)
    _check_in(config, "data.binarize", BINARIZE_MODES)
    _check_in(config, "model.name", MODELS)
    _check_min(config, "model.latent_dim", 1, integer=True)
    _check_min(config, "model.num_res_blocks", 0, integer=True)
    _check_in(config, "model.upsample", ("subpixel", "conv_transpose", "pixel_shuffle"))
    for key in ("model.encoder_widths", "model.decoder_widths"):
        widths = get_key(config, key)
        if len(widths) != 3 or not all(_is_integer(w) and w >= 1 for w in widths):
            _fail(key, widths, "three positive integers")
    if not all(_is_integer(s) and s in (1, 2) for s in config.model.encoder_strides) or \
            len(config.model.encoder_strides) != 3 or \
            list(config.model.encoder_strides).count(2) != 2:
        _fail("model.encoder_strides", config.model.encoder_strides,
              "three strides, two of them 2 and one 1 (28x28 -> 7x7)")
    _check_min(config, "model.encoder_dense", 1, integer=True)


def _validate_loss(config: ml_collections.ConfigDict) -> None:
    """The loss block: likelihood, its reduction and scale, and beta's schedule."""
    _check_in(config, "loss.likelihood", LIKELIHOODS)
    _check_in(config, "loss.reduction", REDUCTIONS)
    if config.loss.likelihood != "mse" and config.loss.reduction != "sum":
        _fail("loss.reduction", config.loss.reduction,
              f"'sum' for the {config.loss.likelihood} likelihood (a log-likelihood sums "
              "over pixels; only mse has a 'mean' variant)")
    _check_in(config, "loss.gaussian_variance", GAUSSIAN_VARIANCES)
    _check_in(config, "model.decoder_scale", DECODER_SCALES)
    scales = decoder_scales_for(config.loss)
    if config.model.decoder_scale not in scales:
        _fail("model.decoder_scale", config.model.decoder_scale,
              f"{' or '.join(map(repr, scales))} for loss.likelihood="
              f"{config.loss.likelihood!r}" + (
                  f" with loss.gaussian_variance={config.loss.gaussian_variance!r}"
                  if config.loss.likelihood == "gaussian" else ""))
    _check_min(config, "loss.beta", 0.0)
    _check_min(config, "loss.beta_start", 0.0)
    _check_in(config, "loss.beta_schedule", BETA_SCHEDULES)
    _check_min(config, "loss.warmup_steps", 0, integer=True)
    _check_min(config, "loss.warmup_epochs", 0.0)
    _check_min(config, "loss.cycle_steps", 0, integer=True)
    if not 0.0 < config.loss.cycle_ratio <= 1.0:
        _fail("loss.cycle_ratio", config.loss.cycle_ratio, "a number in (0, 1]")
    if config.loss.beta_schedule == "linear" and not (config.loss.warmup_steps or
                                                       config.loss.warmup_epochs):
        _fail("loss.warmup_steps", 0, "a warm-up length (loss.warmup_steps or "
              "loss.warmup_epochs) for beta_schedule='linear', or beta_schedule='constant'")
    if config.loss.warmup_steps and config.loss.warmup_epochs:
        _fail("loss.warmup_epochs", config.loss.warmup_epochs,
              "0 when loss.warmup_steps is set (give the warm-up in one unit)")


def _validate_optim(config: ml_collections.ConfigDict) -> None:
    """The optimizer block."""
    _check_in(config, "optim.name", OPTIMIZERS)
    if config.optim.lr_warmup_steps and config.optim.lr_schedule != "warmup_cosine":
        _fail("optim.lr_warmup_steps", config.optim.lr_warmup_steps,
              "0 unless optim.lr_schedule='warmup_cosine' (only it warms up)")
    if config.optim.weight_decay and config.optim.name != "adamw":
        _fail("optim.weight_decay", config.optim.weight_decay,
              "0 unless optim.name='adamw' (only it applies weight decay)")
    if not _is_number(config.optim.learning_rate) or config.optim.learning_rate <= 0:
        _fail("optim.learning_rate", config.optim.learning_rate, "a finite number > 0")
    _check_in(config, "optim.lr_schedule", LR_SCHEDULES)
    _check_min(config, "optim.lr_warmup_steps", 0, integer=True)
    _check_min(config, "optim.weight_decay", 0.0)
    _check_min(config, "optim.grad_clip_norm", 0.0)


def _validate_train_and_runtime(config: ml_collections.ConfigDict) -> None:
    """The train and runtime blocks."""
    _check_min(config, "train.batch_size", 1, integer=True)
    _check_min(config, "train.num_epochs", 0, integer=True)
    _check_min(config, "train.num_steps", 0, integer=True)
    if config.train.num_epochs == 0 and config.train.num_steps == 0:
        _fail("train.num_epochs", 0, "num_epochs >= 1 or num_steps >= 1")
    _check_min(config, "runtime.eval_batch_size", 1, integer=True)
    _check_min(config, "runtime.steps_per_dispatch", 0, integer=True)
    _check_min(config, "runtime.num_devices", 0, integer=True)
    _check_min(config, "runtime.cpu_devices", 0, integer=True)
    _check_min(config, "report.log_every_steps", 1, integer=True)
    _check_min(config, "report.num_figure_images", 0, integer=True)
    _check_in(config, "train.on_nonfinite", ("stop", "skip"))
    _check_min(config, "train.max_skipped_fraction", 0.0)
    if config.train.max_skipped_fraction > 1:
        _fail("train.max_skipped_fraction", config.train.max_skipped_fraction,
              "a fraction between 0 and 1")
    _check_in(config, "runtime.cross_device_reduce", CROSS_DEVICE_REDUCES)
    _check_in(config, "runtime.cpu_convolutions", CPU_CONVOLUTIONS)
    _check_in(config, "runtime.cpu_conv3x3", CPU_CONV3X3)
    _check_min(config, "report.epoch_metrics_images", 0, integer=True)
    _validate_writers(config)


def _validate_writers(config: ml_collections.ConfigDict) -> None:
    """logging.writers: known names, each one's package installed (not imported)."""
    writers = config.logging.writers
    if not isinstance(writers, (tuple, list)) or any(w not in WRITERS for w in writers):
        _fail("logging.writers", writers, f"a tuple of some of {', '.join(WRITERS)}")
    _check_in(config, "logging.wandb_mode", ("online", "offline", "disabled"))
    for name in writers:
        module, extra = WRITER_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"config.logging.writers names {name!r}, but {module} is not "
                              f"installed: pip install \"{extra}\", or leave {name!r} out.")


def _validate_checkpoint_and_eval(config: ml_collections.ConfigDict) -> None:
    """The checkpoint and eval blocks."""
    _check_min(config, "checkpoint.every_steps", 0, integer=True)
    _check_min(config, "checkpoint.keep", 1, integer=True)
    for key in ("eval.iwae_samples", "eval.elbo_samples", "eval.classifier_epochs",
                "eval.probe_steps"):
        _check_min(config, key, 1, integer=True)
    for key in ("eval.iwae_num_images", "eval.iwae_decode_batch", "eval.fd_num_samples",
                "eval.seed"):
        _check_min(config, key, 0, integer=True)
    _check_min(config, "eval.probe_l2", 0.0)
    if config.eval.fd_num_samples == 1:
        _fail("eval.fd_num_samples", 1, "0 (one per test image) or at least 2 (a covariance "
              "needs two samples)")


def run_steps(config: ml_collections.ConfigDict, num_train: int) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run on `num_train` training images."""
    steps_per_epoch = num_train // config.train.batch_size
    return steps_per_epoch, config.train.num_steps or config.train.num_epochs * steps_per_epoch


def beta_warmup_steps(loss_config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """Steps of the linear beta warm-up: loss.warmup_steps, or loss.warmup_epochs' worth."""
    return loss_config.warmup_steps or int(round(loss_config.warmup_epochs * steps_per_epoch))


def beta_cycle_steps(loss_config: ml_collections.ConfigDict, total_steps: int) -> int:
    """Steps of one cycle of the cyclical beta: loss.cycle_steps, or a quarter of the run."""
    return loss_config.cycle_steps or max(1, total_steps // 4)


def check_against_data(config: ml_collections.ConfigDict, num_train: int) -> None:
    """Checks the values that depend on the data, before the first step: the batch, and
    warm-ups that must fit the run (a beta that never reaches loss.beta would be
    reported as loss.beta)."""
    if config.train.batch_size > num_train:
        _fail("train.batch_size", config.train.batch_size,
              f"at most the number of training images ({num_train}); lower it or raise "
              "data.limit_train")
    steps_per_epoch, total = run_steps(config, num_train)
    if config.loss.beta_schedule == "linear":
        key = "loss.warmup_steps" if config.loss.warmup_steps else "loss.warmup_epochs"
        warmup = beta_warmup_steps(config.loss, steps_per_epoch)
        if not 1 <= warmup < total:  # beta reaches loss.beta at step `warmup`; the last
            _fail(key, get_key(config, key),  # step trained is total - 1
                  f"a warm-up of 1 to {total - 1} steps, within the run's {total} "
                  f"({steps_per_epoch} steps per epoch), not {warmup}: beta must reach "
                  "loss.beta. Lengthen or shorten it, or train longer")
    if config.loss.beta_schedule == "cyclical" and beta_cycle_steps(config.loss, total) < 2:
        _fail("loss.cycle_steps", config.loss.cycle_steps,
              f"at least 2 (a cycle of one step never leaves loss.beta_start); the run's "
              f"{total} steps give {beta_cycle_steps(config.loss, total)} by default")
    if config.optim.lr_schedule == "warmup_cosine" and config.optim.lr_warmup_steps >= total:
        _fail("optim.lr_warmup_steps", config.optim.lr_warmup_steps,
              f"fewer than the run's {total} steps, so that the cosine decay has steps left")


def check_against_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Batches are split evenly across devices: their sizes must divide."""
    for key in ("train.batch_size", "runtime.eval_batch_size"):
        if get_key(config, key) % num_devices:
            _fail(key, get_key(config, key), f"a multiple of the {num_devices} devices the batch "
                  "is split over; change it or set runtime.num_devices")
