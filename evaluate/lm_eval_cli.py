"""``quantcal-lm-eval``: lm-evaluation-harness's own command line, with the ``quantcal``
model registered::

    quantcal-lm-eval --model quantcal --model_args path=quantcal-out,provider=cuda \\
        --tasks hellaswag,gsm8k --batch_size 8

lm-eval 0.4.x finds a model name only in its registry, which holds its own models and
those of modules already imported (``@register_model``); it reads no plugin entry points
(0.4.13 and its main branch), and ``--include_path`` adds tasks, not models. So the plain
``lm_eval`` command cannot know ``quantcal``; this one imports
:mod:`.lm_eval_adapter` and then runs ``lm_eval``'s ``cli_evaluate`` with the same
arguments (also as ``python -m quantcal.evaluate.lm_eval_cli``). From Python, import the
adapter and call ``lm_eval.simple_evaluate(model="quantcal", ...)``.

Bad input (no such model, unknown model argument, sampling asked) ends with one line,
``quantcal-lm-eval: error: ...``, and exit status 2. Reads and writes what lm-eval does.
"""

from __future__ import annotations

import sys
from typing import Sequence

from quantcal.errors import QuantcalError, os_error_line

PROG = "quantcal-lm-eval"


def _fail(message: str) -> None:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv: Sequence[str] | None = None) -> None:
    """Run lm-eval's command line (``argv``, default ``sys.argv[1:]``) with ``quantcal``
    registered."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import quantcal.evaluate.lm_eval_adapter  # noqa: F401  registers --model quantcal
    except ImportError as exc:
        _fail(f"lm-evaluation-harness is not usable ({exc}); pip install 'lm-eval>=0.4.13'")
    saved = sys.argv
    if argv is not None:  # lm-eval's parser reads sys.argv only
        sys.argv = [PROG, *argv]
    try:
        cli_evaluate()
    except QuantcalError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(os_error_line(exc))
    except TypeError as exc:  # lm-eval passes --device and --batch_size as model arguments
        if "multiple values for keyword argument" not in str(exc):
            raise
        _fail(f"{exc}: give it once, as lm-eval's own option (--device, --batch_size), "
              "not also in --model_args")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
