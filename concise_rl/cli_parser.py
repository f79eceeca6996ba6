"""The CLI's argument parser: argparse, with the nearest valid name offered for what was mistyped."""

from __future__ import annotations

import argparse


class SuggestingParser(argparse.ArgumentParser):
    """argparse with the nearest valid name offered for a mistyped command, choice or option.

    (Python 3.14's ``suggest_on_error`` does the first two; this project runs on 3.11.)
    """

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            from concise_rl.errors import did_you_mean

            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{did_you_mean(value, action.choices)} (choose from {choices})")
        super()._check_value(action, value)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # Only the top parser reports unknown options (a subparser hands them up); name the
        # nearest option of the command they were given to.
        if extras and self._subparsers is not None:
            from concise_rl.errors import nearest

            command = self._subparsers._group_actions[0].choices.get(getattr(namespace, "command", None), self)
            # Compared without the dashes, which every option shares.
            options = {o.lstrip("-"): o for a in command._actions for o in a.option_strings}
            hints = [f"{options[near]} for {e.split('=')[0]}" for e in extras if e.startswith("-")
                     and (near := nearest(e.split("=")[0].lstrip("-"), options))]
            hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
            command.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace, extras
