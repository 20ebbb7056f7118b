"""The coordinator's offline tools, apart from the federated server beside them in `server/`:
public pretraining before round 1 (`pretrain`), the local rehearsal of a federation
(`simulation`), the SuperLink launcher of a real deployment (`launch`), and the synthetic release
with its privacy gate and page (`release`, `release_page`). None of them runs inside a round."""
