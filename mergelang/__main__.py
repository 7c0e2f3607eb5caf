from mergelang.cli import entry

entry()
