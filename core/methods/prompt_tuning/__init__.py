from core.methods.prompt_tuning.config import PromptTuningConfig
from core.methods.prompt_tuning.layer import PromptHooks, virtual_token_states
from core.methods.prompt_tuning.model import PromptTuningModel, text_init_ids

__all__ = [
    "PromptHooks",
    "PromptTuningConfig",
    "PromptTuningModel",
    "text_init_ids",
    "virtual_token_states",
]
