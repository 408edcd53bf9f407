"""Publishing a finished build: stage (shards + card), validate (dry run), upload to the Hub."""
