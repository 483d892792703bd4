"""`python -m benchmarks` from the repository: the same as `tq bench`."""

from tq.cli.bench import bench

if __name__ == "__main__":
    import typer

    typer.run(bench)
