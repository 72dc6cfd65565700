"""What each parameter may be: one rule per field, with the allowed values as the user should
read them (config.validate turns a broken rule into one line naming the fix)."""
from __future__ import annotations

ARCHS = ("resnet", "vgg", "resnet2")
# torch.compile's modes besides its default (compile=true); the CUDA graph ones matter on a GPU
COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def distinct(values: list) -> bool:
    """A sweep names each point once: two of one value are one child (one key), trained once."""
    return len(set(values)) == len(values)


# (name, check, allowed range as the user should read it)
RULES = [
    ("arch", lambda v: v in ARCHS or v == "", "one of " + "|".join(ARCHS) + " (or empty: the parent's)"),
    ("archs", lambda v: all(a in ARCHS for a in v) and distinct(v), "a list of distinct " + "|".join(ARCHS)),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("bs", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v > 0, "> 0"),
    ("alpha", lambda v: 0 <= v < 1, "0 <= alpha < 1"),
    ("gamma", lambda v: 0 <= v < 1, "0 <= gamma < 1"),
    ("wd", lambda v: v >= 0, ">= 0"),
    ("tol", lambda v: v >= 0, ">= 0"),
    ("patience", lambda v: v >= 1, ">= 1"),
    # numpy takes seeds below 2**32, and a repeat or a trial adds its number to the seed
    ("seed", lambda v: 0 <= v < 2 ** 31, "0 <= seed < 2147483648"),
    ("repeats", lambda v: v >= 1, ">= 1"),
    ("init", lambda v: v in ("parent", "scratch", "auto"), "parent|scratch|auto"),
    ("max_epochs", lambda v: v >= 0, ">= 0 (0 = no cap)"),
    ("max_repeats", lambda v: v >= 0, ">= 0 (0 = no cap)"),
    ("lrs", lambda v: all(x > 0 for x in v) and distinct(v), "distinct numbers > 0"),
    ("gammas", lambda v: all(0 <= x < 1 for x in v) and distinct(v), "distinct numbers in [0, 1)"),
    ("wds", lambda v: all(x >= 0 for x in v) and distinct(v), "distinct numbers >= 0"),
    ("bss", lambda v: all(x >= 1 for x in v) and distinct(v), "distinct integers >= 1"),
    ("probe_epochs", lambda v: v >= 0, ">= 0 (0 = no probe run)"),
    ("probe_tol", lambda v: v >= 0, ">= 0"),
    ("phase1_epochs", lambda v: v >= 0, ">= 0 (0 = no first phase)"),
    ("phase1_lr", lambda v: v > 0, "> 0"),
    ("phase1_bs", lambda v: v >= 1, ">= 1"),
    ("phase1_gamma", lambda v: 0 <= v < 1, "0 <= phase1_gamma < 1"),
    ("phase1_wd", lambda v: v >= 0, ">= 0"),
    ("phase1_tol", lambda v: v >= 0, ">= 0"),
    ("device", lambda v: v in ("auto", "cpu", "cuda"), "auto|cpu|cuda"),
    ("precision", lambda v: v in ("auto", "fp32", "bf16"), "auto|fp32|bf16"),
    ("compile", lambda v: v in ("false", "true", *COMPILE_MODES),
     "false|true|" + "|".join(COMPILE_MODES) + " (true: torch.compile's default mode)"),
    ("eval_bs", lambda v: v >= 0, ">= 0 (0 = automatic: bs on a CPU, max(bs, 1024) on CUDA)"),
    ("data_pipeline", lambda v: v in ("tensor", "torchvision"), "tensor|torchvision"),
    ("num_workers", lambda v: v >= 0, ">= 0"),
    ("checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("executor", lambda v: v in ("local", "ray"), "local|ray"),
    ("lr_schedule", lambda v: v in ("constant", "cosine"), "constant|cosine (cosine: lr falls each epoch towards 0)"),
    ("tuner", lambda v: v in ("seed", "optuna"), "seed|optuna"),
    ("n_trials", lambda v: v >= 1, ">= 1"),
    ("epoch_budget", lambda v: v >= 0, ">= 0 (0 = no budget)"),
    ("trial_epochs", lambda v: v >= 1, ">= 1"),
    ("pruner", lambda v: v in ("median", "hyperband", "none"), "median|hyperband|none"),
    ("startup_trials", lambda v: v >= 0, ">= 0"),
    ("prune_warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("trial_batch", lambda v: v >= 0, ">= 0 (0 = as many as run at once)"),
    ("lr_range", lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1]), "two numbers 0 < low <= high"),
    ("gamma_range", lambda v: not v or (len(v) == 2 and 0 <= v[0] <= v[1] < 1),
     "two numbers 0 <= low <= high < 1"),
    ("wd_range", lambda v: not v or (len(v) == 2 and 0 < v[0] <= v[1]),
     "two numbers 0 < low <= high (wd_zero_below turns the low end into wd=0)"),
    ("wd_zero_below", lambda v: v >= 0, ">= 0 (0 = wd is never 0)"),
    ("trials_from", lambda v: v in ("parent", "best"), "parent|best (best: each trial from the best complete trial so far)"),
    ("cpus_per_trial", lambda v: v > 0, "> 0"),
    ("gpus_per_trial", lambda v: v >= 0, ">= 0 (fractions such as 0.25 share a GPU)"),
    ("max_retries", lambda v: v >= 0, ">= 0"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("dataset", lambda v: v in ("svhn", "synthetic"), "svhn|synthetic"),
    ("limit_train", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("limit_test", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("val_split", lambda v: 0 <= v <= 0.5, "0 <= val_split <= 0.5 (0 = select on test, as the seed)"),
    ("data_seed", lambda v: 0 <= v < 2 ** 32, "0 <= data_seed < 4294967296"),
    ("synthetic_train", lambda v: v >= 1, ">= 1"),
    ("synthetic_test", lambda v: v >= 1, ">= 1"),
    ("env_manager", lambda v: v in ("local", "conda", "virtualenv", "uv"), "local|conda|virtualenv|uv"),
    # MLflow refuses / and : (and names that are paths elsewhere) only at the first registry call,
    # after training, and a name longer than its database column (256) only there too, on
    # PostgreSQL or MySQL; @ would read as an alias in models:/NAME@champion, and ? or # end the
    # name in a URI (MLflow accepts the name, then reads models:/svhn?v2/1 as the logged model "svhn")
    ("registered_model", lambda v: v == "" or (v == v.strip() and not any(c in v for c in "/:@?#")
                                               and v != "." and not v.startswith("..") and len(v) <= 256),
     "a model name of at most 256 characters without /, :, @, ? or #, not . or .. (empty: svhn-classifier, "
     "-synthetic for synthetic data)"),
]
