"""The private Lightning / jsonargparse surface sinkrec/cli.py still relies on (lightning 2.6.6 and
jsonargparse 4.53.0 are pinned in pyproject.toml). If one of these fails after an upgrade, the message
says which behaviour moved and what in sinkrec/cli.py depends on it."""

from __future__ import annotations

import inspect

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from sinkrec.cli import SinkRecCLI


def test_parse_ckpt_path_is_still_the_hook_that_overwrites_the_model_config():
    # SinkRecCLI._parse_ckpt_path replaces it so that --ckpt_path never silently swaps the model config
    assert hasattr(LightningCLI, "_parse_ckpt_path"), (
        "LightningCLI._parse_ckpt_path is gone: find where Lightning now reads hyper-parameters from "
        "--ckpt_path into the config, and move SinkRecCLI._parse_ckpt_path's override there")
    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), (
        "LightningCLI.__init__ no longer calls _parse_ckpt_path: SinkRecCLI's override would never run")
    assert SinkRecCLI._parse_ckpt_path is not LightningCLI._parse_ckpt_path


def test_trainer_defaults_callbacks_are_added_to_the_configured_ones():
    # SinkRecCLI.instantiate_trainer sets trainer_defaults["callbacks"] (last.ckpt, preemption, ...) and
    # calls the public instantiate_trainer, which must add them to trainer.callbacks from the config
    src = inspect.getsource(LightningCLI._instantiate_trainer)
    assert 'self.trainer_defaults[key]' in src and 'config[key].extend(callbacks)' in src, (
        "LightningCLI._instantiate_trainer no longer appends trainer_defaults['callbacks'] to the "
        "configured callbacks: SinkRecCLI._persistent_callbacks would be lost")
    assert "self._instantiate_trainer(" in inspect.getsource(LightningCLI.instantiate_trainer)


def test_the_subcommand_parser_internals_the_error_hints_read():
    # sinkrec.cli.parse_error_message reads the subcommand parser's options to suggest the nearest key
    parser = LightningArgumentParser(exit_on_error=False)
    sub = parser.add_subcommands()
    fit = LightningArgumentParser(exit_on_error=False)
    fit.add_argument("--trainer.max_epochs", type=int, default=1)
    sub.add_subcommand("fit", fit)
    action = getattr(parser, "_subcommands_action", None)
    assert action is not None and action._name_parser_map["fit"] is fit, (
        "jsonargparse's _subcommands_action/_name_parser_map moved: fix parse_error_message in sinkrec/cli.py")
    assert "--trainer.max_epochs" in [o for a in fit._actions for o in a.option_strings]
