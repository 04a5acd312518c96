"""The multi-layer perceptron of the synthetic and Colored MNIST experiments."""
from torch import nn


def init_kaiming(module: nn.Module):
    """Kaiming-normal weights and biases of 0.01 on every Linear layer (the original's init)."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0.01)


class MLP(nn.Sequential):
    """[Linear(in → H), (BatchNorm1d), LeakyReLU, (Dropout)] × n_hidden_layers, then Linear(H → n_outputs).

    With n_hidden_layers = 0 it is logistic regression: one Linear(in → n_outputs).
    """

    def __init__(self, n_inputs, n_hidden_units, n_hidden_layers, n_outputs=1, batch_norm=False, dropout_p=0.0):
        layers = []
        width = n_inputs
        for _ in range(n_hidden_layers):
            layers.append(nn.Linear(width, n_hidden_units))
            if batch_norm:
                layers.append(nn.BatchNorm1d(n_hidden_units))
            layers.append(nn.LeakyReLU())
            if dropout_p > 0:
                layers.append(nn.Dropout(p=dropout_p))
            width = n_hidden_units
        layers.append(nn.Linear(width, n_outputs))
        super().__init__(*layers)
        self.apply(init_kaiming)
