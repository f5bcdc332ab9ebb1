"""The ClientApp: load the global weights, train on a local batch, send the new weights back.

Audited by fedleak with three lines (marked): the import, the client mod, and one call that
declares the batch the client trained on and its local-training protocol (the `if` around it
only lets this example's run config switch the declaration off).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from audited_app.task import Net, load_partition, local_batch, train
from fedleak.client.audit import declare, fedleak_mod  # fedleak

app = ClientApp(mods=[fedleak_mod])  # fedleak: the mod


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """One round of local training."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    lr = float(msg.content["config"]["lr"])
    cfg = context.run_config
    steps, batch_size = int(cfg["local-steps"]), int(cfg["batch-size"])
    examples = int(cfg["examples"])

    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_partition(partition_id, num_partitions)
    seed = int(cfg["seed"]) * 1_000_003 + server_round * 1_009 + partition_id
    xb, yb = local_batch(x, y, examples, seed)
    loss = train(model, xb, yb, lr, steps, batch_size)
    if cfg.get("declare", True):
        declare(xb, yb, learning_rate=lr, local_steps=steps, batch_size=batch_size)  # fedleak

    weights = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    metrics = MetricRecord({"num-examples": len(xb), "train-loss": loss})
    return Message(content=RecordDict({"arrays": weights, "metrics": metrics}), reply_to=msg)
