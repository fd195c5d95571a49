"""A sweep worker for the resume test: a slow quadratic objective through asrlab.sweep.run_study."""

import sys
import time

from asrlab.sweep import run_study


def objective(trial):
    lam = trial.suggest_float("lambda", 0.0, 1.0)
    time.sleep(float(sys.argv[3]))
    return (lam - 0.3) ** 2, {"dev_cer": 100 * (lam - 0.3) ** 2}


if __name__ == "__main__":
    root, n = sys.argv[1], int(sys.argv[2])
    study = run_study("resume-test", objective, n, experiment="sweep_test", run_prefix="w", root=root,
                      enqueue=[{"lambda": 0.0}], show_progress=False, heartbeat_interval=1, grace_period=2)
    print("complete", len([t for t in study.trials if t.state.name == "COMPLETE"]))
