"""nox sessions: `nox -s tests`, `nox -s lint`. CI runs the README's test command directly."""

import nox

nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", *session.posargs, env={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "sdsweep", "tests", "benchmarks", "noxfile.py")
