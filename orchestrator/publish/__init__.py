"""Trained nets people can use: registered MLflow models that load, serve and export.

    mlflow.pytorch.load_model("models:/imagenet_r152@best")        # the net (ResNet)
    mlflow.pyfunc.load_model("models:/imagenet_r152@best").predict(pd.DataFrame({"image": [jpeg]}))
    mlflow models serve -m models:/imagenet_r152@best --env-manager local
    python -m orchestrator.publish --run ID --checkpoint best        # a run already finished
    python -m orchestrator.publish --model imagenet_r50@best --torchvision r50.pth

One concern a module: `classifier` (what a loaded model runs: the net by reference to its
checkpoint, the image pyfunc), `flavor` (the MLflow model folder), `register` (log, register,
alias), `finished` (what a finished job's driver runs: its models and its paper report),
`torchvision_export`, `__main__` (the CLI).
"""
