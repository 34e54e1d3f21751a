"""The inference server: FastAPI app factory (`app.create_app`), model backends (torch, MLX), frame
cache, Prometheus metrics; `server.main` is the CLI behind scripts/inference_server.py and
scripts/mlx_inference_server.py. `client` holds the light helpers the monitor and bench share
(importing this package does not import torch)."""
