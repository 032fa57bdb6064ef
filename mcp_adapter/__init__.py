"""spoold's MCP adapter: a stdio server whose tools read and write the spool through `spoold.api`."""
