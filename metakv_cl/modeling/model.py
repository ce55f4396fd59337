"""A causal LM with Meta-KV behind the model API peft users know.

``get_meta_kv_model(model, config)`` is to Meta-KV what peft's ``get_peft_model`` is to LoRA:
the result forwards and generates like the base model, saves only its own weights with
``save_pretrained`` (or the base model too, on request), loads onto a base model with
``MetaKVModel.from_pretrained(base, folder_or_repo)``, and leaves again through
``merge_and_unload`` / ``unload``. Meta-KV itself stays where :func:`add_meta_kv` puts it (hooks
and a ``meta_kv`` submodule on the base model), so the base model's state-dict keys and
everything else that reads the base model are unchanged.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from metakv_cl.modeling.config import MetaKVConfig
from metakv_cl.modeling.io import CONFIG_FILE, WEIGHTS_FILE, load_meta_kv, read_base_model_record, save_meta_kv
from metakv_cl.modeling.meta_kv import (
    add_meta_kv,
    get_meta_kv,
    has_meta_kv,
    merge_and_remove_meta_kv,
    merge_meta_kv,
    remove_meta_kv,
    unmerge_meta_kv,
)


class MetaKVModel(nn.Module):
    """A transformers causal LM with Meta-KV, with peft's model API.

    Attribute access, ``forward`` and ``generate`` go to the wrapped model (``self.model``), so
    the wrapper drops in wherever the model was used.

    Args:
        model: a transformers causal LM of a registered model type (:mod:`metakv_cl.modeling.families`).
            It gets Meta-KV with ``config`` unless it already has Meta-KV.
        config: the Meta-KV configuration for a model without Meta-KV (default
            ``MetaKVConfig()``); for a model that has Meta-KV it must be None or equal its config.

    Raises:
        TypeError: ``model`` is already a :class:`MetaKVModel`.
        ValueError: ``config`` differs from the config of the model's existing Meta-KV, or
            :func:`add_meta_kv` refuses the model.
    """

    def __init__(self, model: nn.Module, config: MetaKVConfig | None = None):
        super().__init__()
        if isinstance(model, MetaKVModel):
            raise TypeError("model is already a MetaKVModel; pass model.get_base_model() to wrap it again")
        if not has_meta_kv(model):
            add_meta_kv(model, config)
        elif config is not None and get_meta_kv(model).config != config:
            raise ValueError(f"the model already has Meta-KV with {get_meta_kv(model).config}, not {config}; "
                             "pass config=None to wrap it as it is")
        self.model = model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with Meta-KV attached to it)."""
        return self.model

    @property
    def meta_kv_config(self) -> MetaKVConfig:
        return get_meta_kv(self.model).config

    # ------------------------------------------------------------------ weights

    def merge(self) -> None:
        """Fold the consolidated modulation into the K/V projection weights (undo with :meth:`unmerge`)."""
        merge_meta_kv(self.model)

    def unmerge(self) -> None:
        unmerge_meta_kv(self.model)

    def merge_and_unload(self) -> nn.Module:
        """The base model with the consolidated modulation folded into its K/V weights, Meta-KV removed.

        Returns:
            The base model (the same object, changed in place); this wrapper is then empty.

        Raises:
            ValueError: the meta-state is dynamic, so the modulation depends on the input and
                cannot become a weight.
        """
        return merge_and_remove_meta_kv(self._release())

    def unload(self) -> nn.Module:
        """The base model with its original weights and no Meta-KV (this wrapper is then empty)."""
        return remove_meta_kv(self._release())

    def _release(self) -> nn.Module:
        model = self.model
        if not has_meta_kv(model):
            raise RuntimeError("this MetaKVModel was already unloaded")
        return model

    @contextmanager
    def disable_meta_kv(self) -> Iterator[None]:
        """Run the base model inside the block: the modulation is off, Meta-KV parameters kept.

        A dynamic meta-state does not read the tokens run inside the block: continue a cache
        filled inside it inside it, or start a new one after it.

        Raises:
            RuntimeError: the modulation is merged into the base weights (call :meth:`unmerge`).
        """
        meta_kv = get_meta_kv(self.model)
        if meta_kv.merged:
            raise RuntimeError("Meta-KV is merged into the base weights, so it cannot be switched off: "
                               "call unmerge() first")
        meta_kv.enabled = False
        try:
            yield
        finally:
            meta_kv.enabled = True

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), counting shared tensors once."""
        unique = {id(p): p for p in self.parameters()}.values()
        return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ files

    def save_pretrained(self, directory: str | Path, *, save_base_model: bool = False, tokenizer=None) -> Path:
        """Save the Meta-KV config and weights, and with ``save_base_model`` the base model too.

        The record names the base model's type, architecture class and origin, so that
        :meth:`from_pretrained` refuses another architecture and :func:`load_meta_kv_model` can
        find the base model again.

        Args:
            directory: the folder to write (created if missing).
            save_base_model: also write the base model in transformers format, never merged
                and without Meta-KV keys, so the folder loads on its own.
            tokenizer: saved beside the weights when given.

        Returns:
            The folder.
        """
        directory = Path(directory)
        meta_kv = get_meta_kv(self.model)
        was_merged = meta_kv.merged
        if was_merged:
            meta_kv.set_merged(False)  # the files hold the original base weights
        try:
            if save_base_model:
                base_state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("meta_kv.")}
                self.model.save_pretrained(directory, state_dict=base_state)
            save_meta_kv(self.model, directory)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        finally:
            if was_merged:
                meta_kv.set_merged(True)
        return directory

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    commit_message: str = "Upload Meta-KV weights") -> str:
        """Upload the Meta-KV files (as :meth:`save_pretrained` writes them) to a hub model repo.

        Returns:
            The URL of the commit.
        """
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return str(api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, *, revision: str | None = None,
                        token: str | None = None) -> MetaKVModel:
        """Load Meta-KV weights saved by :meth:`save_pretrained` onto a base model.

        Args:
            model: the base model (without Meta-KV, or with Meta-KV of the same config).
            model_id: a local folder, or a hub model repo holding the Meta-KV files.
            revision, token: for a hub repo.

        Raises:
            FileNotFoundError: a file is missing. ValueError: see :func:`load_meta_kv` (checksum,
                base model type or architecture, config).
        """
        return cls(load_meta_kv(model, _meta_kv_folder(model_id, revision, token)))


def get_meta_kv_model(model: nn.Module, config: MetaKVConfig | None = None) -> MetaKVModel:
    """Add Meta-KV to ``model`` (in place) and wrap it, as peft's ``get_peft_model`` does for LoRA."""
    return MetaKVModel(model, config)


def load_meta_kv_model(model_id: str | Path, *, revision: str | None = None, token: str | None = None,
                       **load_kwargs: Any) -> MetaKVModel:
    """Load a saved Meta-KV model, base model included (peft's ``AutoPeftModelForCausalLM``).

    The base model comes from the folder when :meth:`MetaKVModel.save_pretrained` saved it
    there, else from the name recorded at saving.

    Args:
        model_id: a local folder or a hub model repo.
        revision, token: for a hub repo.
        **load_kwargs: passed to :func:`metakv_cl.hub.load_causal_lm` (``dtype``, ...).

    Raises:
        ValueError: the folder holds no base model and records no base model name.
    """
    from metakv_cl.hub import load_causal_lm

    folder = _meta_kv_folder(model_id, revision, token, base_model_too=True)
    if (folder / "config.json").is_file():
        base = load_causal_lm(str(folder), **load_kwargs)
    else:
        name = read_base_model_record(folder).get("name_or_path")
        if not name:
            raise ValueError(f"{model_id}: holds no base model and records no base model name; load the base "
                             "model yourself and call MetaKVModel.from_pretrained(base_model, model_id)")
        base = load_causal_lm(name, **load_kwargs)
    return MetaKVModel.from_pretrained(base, folder)


def _meta_kv_folder(model_id: str | Path, revision: str | None, token: str | None,
                    base_model_too: bool = False) -> Path:
    """A local folder holding the Meta-KV files of ``model_id`` (downloaded when it is a hub repo)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    from huggingface_hub import snapshot_download

    patterns = None if base_model_too else [CONFIG_FILE, WEIGHTS_FILE]
    try:
        return Path(snapshot_download(str(model_id), revision=revision, token=token, allow_patterns=patterns))
    except Exception as error:  # the hub's errors are long and name no local alternative
        reason = str(error).split("\n", 1)[0]
        raise FileNotFoundError(f"{model_id}: not a local folder, and the hub could not provide it ({reason})") from None
