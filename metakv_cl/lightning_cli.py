"""The ``LightningCLI`` behind ``metakv-cl fit | validate | test | compare`` (see :mod:`metakv_cl.cli`).

Imported only when one of these commands runs: it loads Lightning, Avalanche and the models.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from jsonargparse import ArgumentParser, Namespace
from lightning_fabric.utilities.seed import seed_everything
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from metakv_cl.cli import Interrupted, describe_error
from metakv_cl.data.stream import LMBenchmark, TaskStream
from metakv_cl.runfolder import RunFolderError, check_settings, flatten_keys, load_checkpoint, run_lock
from metakv_cl.strategies import STRATEGIES, ContinualStrategy
from metakv_cl.training.module import ContinualLMModule
from metakv_cl.training.passes import is_global_zero
from metakv_cl.training.runner import (
    PRESENTATION_TRAINER_KEYS,
    StreamState,
    compare,
    finish_report,
    run_stream,
    warm_up,
)

# Strategy arguments the CLI supplies itself (never read from the config).
RUNTIME_ARGUMENTS = {"module", "trainer_kwargs", "evaluator", "root_dir", "seed"}

# Top-level settings that do not change what a run computes; every other one is fingerprinted.
UNFINGERPRINTED_SETTINGS = ("config", "ckpt_path", "keep_checkpoints", "torch_num_threads")


def stream_vocab_size(stream: TaskStream) -> int | None:
    """The model vocabulary a stream needs (its own compact/word-level vocabulary, else None)."""
    return stream.vocab_size


def _as_plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


def _strategy_spec_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(ContinualStrategy, "strategy", skip=RUNTIME_ARGUMENTS, instantiate=False, required=True)
    return parser


def resolve_strategy_spec(
    spec: Any, defaults: dict[str, Any] | None = None, where: str = "strategy"
) -> tuple[type[ContinualStrategy], dict[str, Any]]:
    """Check a strategy's ``class_path``/``init_args`` config and return (class, init arguments).

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}`` (dict or jsonargparse Namespace), or
            just the class path.
        defaults: init arguments given to the strategy when its class accepts them and the
            spec does not set them.
        where: how the spec is named in error messages.

    Raises:
        ValueError: unknown strategy class, or init arguments it does not accept or mistypes.
    """
    spec = _as_plain(spec)
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{where}: expected a mapping with class_path (and init_args), got {spec!r}")
    cls = _strategy_class_from_path(spec["class_path"], where)
    accepted = _init_parameters(cls)
    init_args = {key: value for key, value in (defaults or {}).items() if key in accepted}
    init_args.update(_as_plain(spec.get("init_args")) or {})
    try:
        parsed = _strategy_spec_parser().parse_object(
            {"strategy": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": init_args}}
        )
    except Exception as error:  # jsonargparse names the bad key or type
        raise ValueError(f"{where} ({cls.__name__}): {error}") from None
    return cls, _as_plain(parsed.strategy.init_args) or {}


def build_strategy(
    spec: Any,
    *,
    module: ContinualLMModule,
    trainer_kwargs: dict[str, Any],
    seed: int,
    root_dir: Path | None = None,
    defaults: dict[str, Any] | None = None,
    where: str = "strategy",
) -> ContinualStrategy:
    """Instantiate a strategy from its ``class_path``/``init_args`` config.

    Args:
        spec: see :func:`resolve_strategy_spec`.
        module: the model to train.
        trainer_kwargs: Lightning Trainer arguments.
        seed: the run's seed.
        root_dir: the strategy's run folder.
        defaults: see :func:`resolve_strategy_spec`.
        where: how the spec is named in error messages.

    Returns:
        The strategy.
    """
    cls, init_args = resolve_strategy_spec(spec, defaults, where)
    return _factory(cls, init_args, trainer_kwargs, seed, where)(module, root_dir)


def instantiate_plugins(specs: Sequence[Any] | None, where: str = "strategy") -> list:
    """New plugin objects from their ``class_path``/``init_args`` configs.

    Plugins hold state (a buffer, a Fisher), so every strategy gets its own.

    Raises:
        ValueError: a spec that does not name a plugin class or that its class refuses.
    """
    from avalanche.core import BasePlugin

    if not specs:
        return []
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--plugins", type=list[BasePlugin])
    try:
        return parser.instantiate_classes(parser.parse_object({"plugins": [_as_plain(spec) for spec in specs]})).plugins
    except Exception as error:  # jsonargparse names the bad key or type; a plugin its bad value
        raise ValueError(f"{where}.plugins: {describe_error(error)}") from None


def plugin_classes(specs: Sequence[Any] | None) -> list[type]:
    """The classes named by plugin configs (resolved after :func:`resolve_strategy_spec` checked them)."""
    import importlib

    classes = []
    for spec in specs or []:
        module_name, _, name = _as_plain(spec)["class_path"].rpartition(".")
        classes.append(getattr(importlib.import_module(module_name), name))
    return classes


def _strategy_class_from_path(class_path: str, where: str) -> type[ContinualStrategy]:
    import importlib

    known = known_strategies()
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "metakv_cl.strategies"), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"{where}: unknown strategy {class_path!r}; known strategies: {known}") from None
    if not (isinstance(cls, type) and issubclass(cls, ContinualStrategy)):
        raise ValueError(f"{where}: {class_path!r} is not a ContinualStrategy; known strategies: {known}")
    return cls


def known_strategies() -> str:
    presets = ", ".join(f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}" for cls in STRATEGIES.values())
    return f"metakv_cl.strategies.ContinualStrategy (with plugins), {presets}"


def _init_parameters(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        names.update(inspect.signature(klass.__init__).parameters)
    return names - {"self", "args", "kwargs"}


def _resume_requested(ckpt_path: str | None, command: str) -> bool:
    if ckpt_path is None:
        return False
    if ckpt_path == "last":
        return True
    raise ValueError(
        f"{command} resumes a whole stream from <default_root_dir>/stream_state: use --ckpt_path last "
        f"(got {ckpt_path!r})"
    )


class ContinualCLI(LightningCLI):
    """``LightningCLI`` whose ``fit`` runs a continual-learning stream (see the module docstring)."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs: Any):
        super().__init__(
            model_class=ContinualLMModule,
            datamodule_class=TaskStream,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            auto_configure_optimizers=False,
            save_config_callback=None,
            parser_kwargs={"exit_on_error": False},  # main() shows parse errors as one line
            args=args,
            run=run,
            **kwargs,
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning's version (a private API) merges a --ckpt_path file's hyper-parameters into
        # the config, ``_class_path`` included: a checkpoint could then import any module and
        # replace the user's model settings. The config comes from the user alone; the file is
        # only checked here, so an unsafe or unreadable one fails before anything is built.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path != "last" and Path(ckpt_path).is_file():
            load_checkpoint(ckpt_path)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # predict has no meaning for a stream; fit/validate/test keep Lightning's arguments
        return {key: value for key, value in LightningCLI.subcommands().items() if key != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "metakv_cl.training.ContinualLMModule"},
                "data": {"class_path": "metakv_cl.data.TaskStream"},
            }
        )
        parser.link_arguments("data", "model.init_args.vocab_size", compute_fn=stream_vocab_size, apply_on="instantiate")
        parser.add_argument(
            "--keep_checkpoints", type=bool, default=False, help="Keep every experience's per-epoch checkpoints."
        )
        parser.add_argument(
            "--torch_num_threads",
            type=int | None,
            default=None,
            help="CPU threads for torch (default: torch's choice). Tiny models run fastest on 1.",
        )
        self.add_strategy_arguments(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_config_values(_as_plain(config))
        threads = self._setting("torch_num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_num_threads must be >= 1, got {threads}")
            import torch

            torch.set_num_threads(threads)
        if is_global_zero():
            for note in cpu_training_notes(_as_plain(config.get("trainer")) or {}):
                print(f"metakv-cl: note: {note}", file=sys.stderr)

    def add_strategy_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_subclass_arguments(
            ContinualStrategy, "strategy", skip=RUNTIME_ARGUMENTS, instantiate=False, required=True
        )

    # ------------------------------------------------------------------ shared set-up

    def _setting(self, key: str, default: Any = None) -> Any:
        return self._get(self.config, key, default)

    def trainer_kwargs(self) -> dict[str, Any]:
        """The configured Trainer arguments (callbacks and logger instantiated)."""
        kwargs = _as_plain(self._get(self.config_init, "trainer", default={}))
        return dict(kwargs)

    def root_dir(self) -> Path:
        return Path(self.trainer_kwargs().get("default_root_dir") or Path.cwd())

    def seed(self) -> int:
        seed = self._setting("seed_everything", 0)
        return 0 if seed is False else int(seed)

    def result_settings(self) -> dict[str, Any]:
        """The config without the settings that only change how or where a run is shown or saved."""
        config = _as_plain(self.config[self.subcommand] if self.subcommand else self.config)
        settings = {key: value for key, value in config.items() if key not in UNFINGERPRINTED_SETTINGS}
        trainer = _as_plain(settings.get("trainer")) or {}
        settings["trainer"] = {key: value for key, value in trainer.items() if key not in PRESENTATION_TRAINER_KEYS}
        return settings

    def run_lock(self):
        """The run folder's lock (rank 0 takes it: the other ranks are this run's own processes)."""
        return run_lock(self.root_dir()) if is_global_zero() else contextlib.nullcontext()

    def prepare(self, modules: Sequence[ContinualLMModule], stream: TaskStream, resume: bool) -> LMBenchmark:
        """Build the benchmark, check vocabulary sizes and (on resume) the settings, save the
        config and the settings, warm up each module (once, however often it is listed)."""
        modules = list({id(module): module for module in modules}.values())
        positions = [module.max_positions for module in modules if module.max_positions is not None]
        benchmark = stream.build(min(positions, default=None))
        tokenizer_size = len(stream.tokenizer())
        for module in modules:
            if module.vocab_size is not None and tokenizer_size > module.vocab_size:
                raise ValueError(
                    f"the stream's tokenizer has {tokenizer_size} tokens but the model's vocabulary has "
                    f"{module.vocab_size}; use a matching model or data.compact_vocabulary with a from-scratch model"
                )
        root = self.root_dir()
        # Every rank compares (a rank refused alone would leave the others waiting in a
        # collective); rank 0 alone records. First: a refused resume keeps config.yaml.
        check_settings(root, self.result_settings(), resume, record=is_global_zero())
        if is_global_zero():
            parser = self._parser(self.subcommand)
            config = self.config[self.subcommand] if self.subcommand else self.config
            parser.save(config, root / "config.yaml", overwrite=True, multifile=False)
        for module in modules:
            warm_up(
                module,
                benchmark,
                root_dir=root,
                epochs=stream.warmup_epochs if stream.warmup_experiences else 0,
                trainer_kwargs=self.trainer_kwargs(),
                seed=self.seed(),
                resume=resume,
                echo=print,
            )
        return benchmark

    def strategy(self, module: ContinualLMModule) -> ContinualStrategy:
        return build_strategy(
            self._setting("strategy"),
            module=module,
            trainer_kwargs=self.trainer_kwargs(),
            seed=self.seed(),
            root_dir=self.root_dir(),
        )

    # ------------------------------------------------------------------ subcommands

    def fit(self, model: ContinualLMModule, datamodule: TaskStream | None = None, ckpt_path: str | None = None, **_):
        """Run the whole stream with the configured strategy; print the table, write the report."""
        resume = _resume_requested(ckpt_path, "fit")
        started = time.perf_counter()
        with self.run_lock():
            benchmark = self.prepare([model], datamodule, resume)
            result = run_stream(
                self.strategy(model),
                benchmark,
                root_dir=self.root_dir(),
                resume=resume,
                keep_checkpoints=self._setting("keep_checkpoints", False),
                echo=print,
            )
            finish_report([result], self.root_dir())
        if is_global_zero():
            print(f"total wall time: {time.perf_counter() - started:.1f}s")

    def validate(self, model: ContinualLMModule, datamodule: TaskStream | None = None, ckpt_path: str | None = None, **_):
        """Score every experience of the stream with a trained model and print the scores."""
        self.evaluate_stream(model, datamodule, ckpt_path)

    def test(self, model: ContinualLMModule, datamodule: TaskStream | None = None, ckpt_path: str | None = None, **_):
        """Same as :meth:`validate` (a stream's experiences have one held-out split)."""
        self.evaluate_stream(model, datamodule, ckpt_path)

    def evaluate_stream(self, module: ContinualLMModule, stream: TaskStream, ckpt_path: str | None) -> dict[int, float]:
        """Evaluate ``module`` (restored from ``ckpt_path``) on every test experience."""
        benchmark = stream.build(module.max_positions)
        strategy = self.strategy(module)
        strategy.experience_names = benchmark.experience_names
        if ckpt_path == "last":
            StreamState(self.root_dir()).load(strategy, benchmark)
        elif ckpt_path is not None:
            if not Path(ckpt_path).is_file():
                raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
            checkpoint = load_checkpoint(ckpt_path)
            module.load_state_dict(checkpoint.get("state_dict", checkpoint))
        strategy.eval(benchmark.test_stream)
        if is_global_zero():
            lines = [f"| experience | {benchmark.score_name} |", "|---|---|"]
            lines += [
                f"| {j}: {name} | {strategy.eval_scores[j]:.4f} |" for j, name in enumerate(benchmark.experience_names)
            ]
            print("\n".join(lines))
        return dict(strategy.eval_scores)


# The keys of one `strategies:` entry of `compare`.
ENTRY_KEYS = ("class_path", "init_args", "model")


class CompareCLI(ContinualCLI):
    """``metakv-cl compare``: several strategies on one stream, one side-by-side report.

    Each strategy trains its own module: the shared ``model`` config with the entry's ``model:``
    init args in place of the shared ones (a key's value replaces the shared value whole). A
    strategy that does not train Meta-KV (neither the ``MetaKVConsolidation`` preset nor its plugin:
    every baseline) runs on the plain model, without the shared ``model.init_args.meta_kv``,
    unless its entry sets ``meta_kv``.
    Entries whose module settings are equal share one built (and warmed-up) module; each
    strategy trains a copy of it.
    """

    def __init__(self, args: Sequence[str] | None = None, **kwargs: Any):
        super().__init__(args=args, run=False, **kwargs)

    def add_strategy_arguments(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--strategies",
            type=list[dict[str, Any]],
            required=True,
            help="Strategies to compare: a list of {class_path, init_args, model}; `model` holds init args of "
            "the model class that replace the shared ones for that strategy (e.g. {lr: 1e-3, meta_kv: null}).",
        )
        parser.add_argument(
            "--strategy_defaults",
            type=dict[str, Any],
            default={},
            help="Init arguments for every strategy that accepts them (e.g. train_mb_size).",
        )
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="'last' resumes an interrupted comparison.")

    def run(self) -> list:
        """Run every strategy, write the combined report, print the table."""
        resume = _resume_requested(self._setting("ckpt_path"), "compare")
        started = time.perf_counter()
        entries = self._setting("strategies")
        if not entries:
            raise ValueError("compare: `strategies` is empty; list at least one strategy")
        defaults = _as_plain(self._setting("strategy_defaults")) or {}
        # every entry is checked before any module is built or anything trains
        plans = [self._plan(entry, defaults, f"strategies[{index}]") for index, entry in enumerate(entries)]
        modules = self._modules([module_config for _, _, module_config in plans])
        trainer_kwargs, seed = self.trainer_kwargs(), self.seed()
        factories = [
            _factory(cls, init_args, trainer_kwargs, seed, f"strategies[{index}]")
            for index, (cls, init_args, _) in enumerate(plans)
        ]
        with self.run_lock():
            benchmark = self.prepare(modules, self.datamodule, resume)
            results = compare(
                factories,
                modules,
                benchmark,
                root_dir=self.root_dir(),
                resume=resume,
                keep_checkpoints=self._setting("keep_checkpoints", False),
                echo=print,
            )
            finish_report(results, self.root_dir())
        if is_global_zero():
            print(f"total wall time: {time.perf_counter() - started:.1f}s")
        return results

    def _plan(
        self, entry: Any, defaults: dict[str, Any], where: str
    ) -> tuple[type[ContinualStrategy], dict[str, Any], Namespace]:
        """(strategy class, its init args, the parsed config of its module) of one entry."""
        entry = _as_plain(entry)
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - set(ENTRY_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r}; an entry has {', '.join(ENTRY_KEYS)}")
        cls, init_args = resolve_strategy_spec(entry, defaults, where)
        override = entry.get("model") if isinstance(entry, dict) else None
        return cls, init_args, self._module_config(cls, init_args, _as_plain(override) or {}, f"{where}.model")

    def _module_config(
        self, cls: type[ContinualStrategy], strategy_args: dict[str, Any], override: Any, where: str
    ) -> Namespace:
        """The shared model config with ``override``'s init args (and baselines without Meta-KV), checked."""
        allowed = sorted(_init_parameters(type(self.model)) - {"vocab_size"})  # the stream sets vocab_size
        if not isinstance(override, dict):
            raise ValueError(f"{where}: expected a mapping of init args ({', '.join(allowed)}), got {override!r}")
        unknown = sorted(set(override) - set(allowed))
        if unknown:
            raise ValueError(
                f"{where}: {type(self.model).__name__} has no init arg {unknown[0]!r}; allowed: {', '.join(allowed)}"
            )
        init_args = {**self._shared_module_init_args(), **override}
        if "meta_kv" not in override and not cls.trains_meta_kv(plugin_classes(strategy_args.get("plugins"))):
            init_args["meta_kv"] = None  # a baseline runs on the plain model unless its entry says otherwise
        return self._parse_module(init_args, where)

    def _shared_module_init_args(self) -> dict[str, Any]:
        return {**_as_plain(self.config["model"]).get("init_args", {}), "vocab_size": stream_vocab_size(self.datamodule)}

    def _module_parser(self) -> ArgumentParser:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(type(self.model), "model")
        return parser

    def _parse_module(self, init_args: dict[str, Any], where: str) -> Namespace:
        try:
            return self._module_parser().parse_object({"model": init_args})
        except Exception as error:  # jsonargparse names the bad key and value
            raise ValueError(f"{where}: {describe_error(error)}") from None

    def _modules(self, configs: list[Namespace]) -> list[ContinualLMModule]:
        """One module per entry; entries with equal configs share one, the shared model where it fits.

        Each module is built right after seeding with the run's seed, as the shared model was, so
        modules that differ only in their Meta-KV or optimiser settings start from the same base weights.
        """
        shared = _config_key(self._parse_module(self._shared_module_init_args(), "model"))
        built: dict[str, ContinualLMModule] = {shared: self.model}
        modules = []
        for config in configs:
            key = _config_key(config)
            if key not in built:
                seed_everything(self.seed(), workers=True, verbose=False)
                built[key] = self._module_parser().instantiate_classes(config).model
            modules.append(built[key])
        return modules


def _config_key(config: Namespace) -> str:
    return json.dumps(_as_plain(config), sort_keys=True, default=str)


def _factory(
    cls: type[ContinualStrategy], init_args: dict[str, Any], trainer_kwargs: dict[str, Any], seed: int, where: str
):
    """``(module, root_dir=None) -> strategy``, with new plugin objects for every strategy it makes."""

    def make(module: ContinualLMModule, root_dir: Path | None = None) -> ContinualStrategy:
        arguments = dict(init_args)
        if "plugins" in arguments:
            arguments["plugins"] = instantiate_plugins(arguments["plugins"], where)
        try:
            return cls(**arguments, module=module, trainer_kwargs=trainer_kwargs, seed=seed, root_dir=root_dir)
        except ValueError as error:  # a plugin combination or a value the strategy refuses
            error.args = (f"{where} ({cls.__name__}): {error}",)  # keeps the error's type (plugin conflicts)
            raise error from None

    return make


def run_command(command: str, arguments: list[str]) -> None:
    """Run ``metakv-cl COMMAND`` for a command of :data:`metakv_cl.cli.LIGHTNING_COMMANDS`.

    Raises:
        Interrupted: Lightning stopped the run after a SIGTERM.
        SystemExit: 1 when the run folder is busy, unreadable or holds other settings.
    """
    _configure_output()
    try:
        if command == "compare":
            CompareCLI(args=arguments).run()
        else:
            ContinualCLI(args=[command, *arguments])
    except SIGTERMException:  # Lightning's own stop after a SIGTERM that reached only its handler
        raise Interrupted(signal.SIGTERM) from None
    except RunFolderError as error:  # its message is the whole story: no exception type in front
        print(f"metakv-cl: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def _configure_output() -> None:
    """Keep the console readable: one Trainer per phase would repeat Lightning's notices."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    # main() hands LightningCLI the arguments after the command name on purpose
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")



# Precisions whose matmuls a CPU without bf16 instructions emulates.
BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16 or AMX)."""
    import torch

    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_training_notes(trainer: dict[str, Any]) -> list[str]:
    """Settings that make training on the CPU several times slower than it could be, one line each.

    A torch thread that waits for a core other processes hold stalls every parallel region of
    the step; bf16 without bf16 instructions converts every matmul's operands in software.

    Args:
        trainer: the run's Trainer arguments.

    Returns:
        The notes; none when the run trains on a GPU.
    """
    import os

    import torch

    accelerator = str(trainer.get("accelerator") or "auto")
    if accelerator not in ("cpu", "auto") or (accelerator == "auto" and torch.cuda.is_available()):
        return []
    notes = []
    precision = str(trainer.get("precision"))
    if precision in BF16_PRECISIONS and not cpu_has_bf16():
        notes.append(
            f"precision {precision} on a CPU without bf16 instructions (AVX512-BF16, AMX) emulates every matmul; "
            "precision 32-true trains several times faster here"
        )
    threads, cores, load = torch.get_num_threads(), os.cpu_count() or 1, os.getloadavg()[0]
    if threads > 1 and threads > cores - load + 0.5:
        notes.append(
            f"{threads} torch threads on {cores} cores with a load average of {load:.1f}: threads that wait for busy "
            "cores slow every step several-fold; set torch_num_threads (1 on a busy machine)"
        )
    return notes


def check_config_values(config: dict[str, Any]) -> None:
    """Refuse config values that every component would accept but that make a run meaningless.

    Raises:
        ValueError: a NaN or infinite number anywhere (a NaN learning rate or penalty weight
            trains garbage without an error), or Trainer limits that train nothing.
    """
    for key, value in flatten_keys(config).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}: {value} is not a finite number; give a finite value")
    trainer = config.get("trainer") or {}
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_epochs is not None and max_epochs < 1 and not (max_epochs == -1 and max_steps not in (None, -1)):
        raise ValueError(
            f"trainer.max_epochs: {max_epochs} would train nothing (or forever); give epochs per experience >= 1 "
            "(-1 only together with trainer.max_steps)"
        )
    if trainer.get("limit_train_batches") == 0:
        raise ValueError("trainer.limit_train_batches: 0 would train nothing; give a share in (0, 1] or a batch count >= 1")
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise ValueError(
            f"trainer.max_steps: {max_steps} would train nothing; give steps >= 1, or -1 for no step limit"
        )


