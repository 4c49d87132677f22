"""The dataset-quality report: figures, metrics, the ablation table, plots and the HTML page."""
