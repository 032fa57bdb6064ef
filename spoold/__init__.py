"""spoold: a filesystem spool that runs prompts through the Claude Code CLI."""

__version__ = "0.1.0"
