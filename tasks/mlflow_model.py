"""A registered version as an MLflow Model: the transformers flavor with a chat task.

Every version the pipeline registers is logged as an MLflow Model (``mlflow.transformers``,
task ``llm/v1/chat``, with its signature and an input example in the model's own prompt
style), so ``mlflow models serve -m models:/NAME@champion`` answers chat requests and
``mlflow.transformers.load_model`` / ``mlflow.pyfunc.load_model`` load it. The layout under
the version's artifact folder:

- ``MLmodel``, ``requirements.txt``, ``input_example.json``: MLflow's;
- ``model/``: the checkpoint's own Hugging Face folder, file for file as the artifact store
  holds it (weights, config, tokenizer, chat template), plus the card: what vLLM or TGI
  serve and what every later stage of the pipeline loads;
- ``components/tokenizer/``: the tokenizer again, where MLflow's loader looks for it;
- ``README.md`` (also in ``model/``): the model card (tasks/model_card.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from importlib.metadata import version as package_version
from pathlib import Path

import torch

from concise_rl.config import PipelineConfig
from concise_rl.errors import ModelLoadError

log = logging.getLogger(__name__)

CHAT_TASK = "llm/v1/chat"
MLMODEL = "MLmodel"
HF_SUBDIR = "model"  # where mlflow.transformers keeps the model's own files
CARD = "README.md"
MLFLOW_CARD = "model_card.md"  # where mlflow.transformers writes a card
# What serving the model needs, at the versions that saved it (MLflow's own inference of them
# imports and runs the model in a subprocess; these are known).
REQUIREMENTS = ("mlflow", "transformers", "torch", "accelerate", "tokenizers", "safetensors")


def hf_folder(path: str | Path) -> Path:
    """The Hugging Face model folder of a version's artifact folder: ``model/`` under an MLflow
    Model, the folder itself for a plain model folder (versions registered before MLflow Models)."""
    path = Path(path)
    if (path / MLMODEL).is_file() and (path / HF_SUBDIR / "config.json").is_file():
        return path / HF_SUBDIR
    return path


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The precision the checkpoint's weights are stored in (its config's ``dtype``), so saving it
    as an MLflow Model neither widens a bf16 model to float32 nor narrows a float32 one."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelLoadError(f"{model_dir}/config.json: unknown dtype {name!r}; expected e.g. bfloat16 or float32")
    return dtype


def example_messages(cfg: PipelineConfig) -> list[dict[str, str]]:
    """One chat request in the prompt style the model was trained on (prompt.style, prompt.instruction)."""
    from concise_rl.synthetic import generate_problems
    from concise_rl.training.models import is_embedded, prompt_messages

    if is_embedded(cfg.model):
        question = generate_problems(1, seed=0, min_level=3, max_level=3, split="heldout")[0].prompt
    else:
        question = "What is the sum of the first ten positive odd integers?"
    return prompt_messages(question, cfg.prompt)


def requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        installed = package_version(name)
        # torch's CPU build reports 2.13.0+cpu; the pin a serving environment can install is the release.
        pins.append(f"{name}=={installed.split('+')[0]}")
    return pins


def save(model_dir: Path, out: Path, cfg: PipelineConfig, card: str) -> Path:
    """Write the Hugging Face folder ``model_dir`` to ``out`` as an MLflow Model with model card ``card``."""
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    dtype = stored_dtype(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        path=str(out),
        task=CHAT_TASK,
        torch_dtype=dtype,
        input_example={"messages": example_messages(cfg), "max_tokens": 512},
        pip_requirements=requirements(),
        # Our card, so MLflow neither looks one up on the hub nor warns that it could not.
        model_card=ModelCard(card),
    )
    del model
    # model/ becomes the checkpoint's own folder, file for file (the bytes the artifact store holds,
    # with the tokenizer and chat template next to the weights), instead of save_model's re-save of it.
    shutil.rmtree(out / HF_SUBDIR)
    shutil.copytree(model_dir, out / HF_SUBDIR)
    write_card(out, card)
    log.info("saved %s as an MLflow Model (%s, %s) in %s", model_dir, CHAT_TASK, dtype, out)
    return out


def write_card(mlflow_dir: Path, card: str) -> list[Path]:
    """The card in every place a reader looks: README.md at the top and in model/, and MLflow's model_card.md."""
    paths = [mlflow_dir / CARD, mlflow_dir / HF_SUBDIR / CARD, mlflow_dir / MLFLOW_CARD]
    for path in paths:
        path.write_text(card, encoding="utf-8")
    return paths
