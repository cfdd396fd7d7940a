"""Turn the per-run result files of an experiment into its report and Fig. 3 (docs/results/ by default).

Each run (one model trained one way: alone on one edge's shard, centrally on all data, or
federated) leaves one JSON file in a results folder, next to a ``meta.json`` that describes the
setup. This package only reads those files and formats them: the analogues of the paper's Table 1
(model size and upload per round), Table 2 (accuracy per test set and manner) and Fig. 3 (accuracy
against uploaded megabytes). One module per job: ``load`` (reading and validating the files),
``cells`` (numbers and labels as table text), ``tables``, ``figure`` and ``document`` (the setup
in prose and ``write_report``).

Sizes are in MB = 10^6 bytes; accuracies in the files are fractions, shown here in per cent, and
1-NED (``char_accuracy``) is shown as a fraction with three decimals.
"""
