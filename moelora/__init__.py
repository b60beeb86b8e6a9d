"""moelora: mixtures of LoRA experts (MixLoRA, MiLoRA) and LoRA/DoRA on transformers causal LMs.

    import moelora
    model = moelora.attach(model, moelora.MixLoraConfig(num_experts=8, top_k=2))
    loss = model(input_ids, attention_mask=mask, labels=labels).loss   # router loss included
    moelora.save_adapter(model, "my-adapter")
    moelora.load_adapter(other_model, "my-adapter")
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, export_mixlora, load_adapter, save_adapter  # noqa: E402
from .config import ConfigError, LoraConfig, MiLoraConfig, MixLoraConfig  # noqa: E402
from .inject import (  # noqa: E402
    ARCHITECTURES,
    add_weighted_adapter,
    attach,
    detach,
    disable_adapter,
    get_context,
    merge_and_unload,
    set_adapter,
    set_backend,
    set_recompute,
    use_adapter,
)
from .reward import load_value_head, reward_scores, save_value_head  # noqa: E402
from .stats import count_parameters, expert_load, param_groups  # noqa: E402

__all__ = [
    "__version__",
    "LoraConfig",
    "MixLoraConfig",
    "MiLoraConfig",
    "ConfigError",
    "CheckpointError",
    "attach",
    "detach",
    "disable_adapter",
    "merge_and_unload",
    "add_weighted_adapter",
    "set_adapter",
    "set_backend",
    "set_recompute",
    "use_adapter",
    "save_adapter",
    "load_adapter",
    "export_mixlora",
    "get_context",
    "count_parameters",
    "expert_load",
    "param_groups",
    "reward_scores",
    "load_value_head",
    "save_value_head",
    "ARCHITECTURES",
]
