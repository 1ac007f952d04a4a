"""moe-stack trainer: fast Mixture-of-Experts fine-tuning on the Hugging Face transformers v5 API."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import trainer` stays light for the CLI
    if name == "MoEAutoModelForCausalLM":
        from trainer.models import MoEAutoModelForCausalLM

        return MoEAutoModelForCausalLM
    if name == "ParallelConfig":
        from trainer.parallel.config import ParallelConfig

        return ParallelConfig
    raise AttributeError(name)
