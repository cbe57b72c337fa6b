"""Train state, optimizer, pure steps, checkpoints, metrics and the loop that ties them."""
