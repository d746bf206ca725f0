from ..cli import main

raise SystemExit(main(["bench", *__import__("sys").argv[1:]]))
