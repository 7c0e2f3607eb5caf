"""Distributed execution: the Ray executor (`mergelang run --executor ray`).

The driver (`ray_driver.RayExecutor`, the run contract of runtime/executor.py, chosen by
`executors.executor_for`) keeps everything that makes a run trustworthy — the work
folder, the journal, verification, the rename into place — and hands units of work to Ray
actors (`ray_worker.MergeWorker`), each of which compiles the same recipe from a filesystem it
shares with the driver, checks that its plan is the driver's, and computes the outputs of a
unit, writing their bytes straight into the driver's preallocated shards. Ray is an optional
extra (`pip install "mergelang[ray]"`); nothing here imports it before a Ray run starts.
"""
