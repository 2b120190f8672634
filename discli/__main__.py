from discli.cli.app import run

run()
