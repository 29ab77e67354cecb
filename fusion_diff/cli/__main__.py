from fusion_diff.cli.failures import entry

entry()
