"""The `xpmodel` command: main.py parses the arguments, commands.py does what each subcommand asks."""
