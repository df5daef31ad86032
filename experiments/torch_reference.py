"""The reference release's CARE step in PyTorch: the baseline the benchmarks compare with.

Transcribed from the release's algorithm, not optimised: NT-Xent as exp then
log over a masked_select of the similarity matrix with the negative mask built
by a Python loop on every call; the equivariance loss in a per-chunk Python
loop with a masked_select per chunk; four separate forward passes (x1, x2, e1,
e2) through a torchvision-layout ResNet (CIFAR stem: 3x3 stride-1 conv, no
max-pool, no fc) and the Linear -> BN -> ReLU -> Linear head; Adam; fp32 eager
with PyTorch's default precision settings, as the release runs (on a GPU:
TF32 convolutions, full-fp32 matmuls).

torchvision is not needed: the ResNet is written out here in its layout.
Import only where torch is installed (experiments check with _torch_module()).
"""

from __future__ import annotations


def torch_module():
  try:
    import torch  # noqa: PLC0415 (optional dependency)
    return torch
  except ImportError:
    return None


def care_loss_fn(torch, device, temperature: float, equiv_weight: float):
  """care(z1, z2, e1, e2, num_chunks) -> loss, the release's formulation."""

  def negative_mask(batch_size):
    mask = torch.ones((batch_size, 2 * batch_size), dtype=torch.bool)
    for i in range(batch_size):
      mask[i, i] = 0
      mask[i, i + batch_size] = 0
    return torch.cat((mask, mask), 0)

  def care(z1, z2, e1, e2, num_chunks):
    b = z1.shape[0]
    out = torch.cat([z1, z2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    neg = neg.masked_select(negative_mask(b).to(device)).view(2 * b, -1)
    pos = torch.exp(torch.sum(z1 * z2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    nce = (-torch.log(pos / (pos + neg.sum(dim=-1)))).mean()
    n = b // num_chunks
    equi = 0.0
    for k in range(num_chunks):
      a, c = e1[k * n:(k + 1) * n], e2[k * n:(k + 1) * n]
      offdiag = ~torch.eye(n, dtype=torch.bool, device=device)
      diff = (torch.mm(a, a.t()) - torch.mm(c, c.t())).masked_select(offdiag)
      equi = equi + (diff ** 2).sum() * 2.0 / n
    return nce + equiv_weight * equi / num_chunks

  return care


def resnet_model(torch, name: str, width: float = 1.0, proj_hidden_dim: int = 512, proj_dim: int = 128):
  """torchvision-layout CIFAR ResNet-18/50 + the release's projection head; forward -> unit projections."""
  nn = torch.nn
  widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
  stages = {"resnet18": (2, 2, 2, 2), "resnet50": (3, 4, 6, 3)}[name]
  expansion = 4 if name == "resnet50" else 1

  class Basic(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

  class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride):
      super().__init__()
      cout = planes * 4
      self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(cout)
      self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = torch.relu(self.bn2(self.conv2(y)))
      return torch.relu(self.bn3(self.conv3(y)) + self.short(x))

  class Model(nn.Module):
    def __init__(self):
      super().__init__()
      layers = [nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
      cin = widths[0]
      block = Bottleneck if expansion == 4 else Basic
      for stage, (blocks, w) in enumerate(zip(stages, widths)):
        for i in range(blocks):
          layers.append(block(cin, w, 2 if stage > 0 and i == 0 else 1))
          cin = w * expansion
      layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
      self.backbone = nn.Sequential(*layers)
      self.head = nn.Sequential(nn.Linear(cin, proj_hidden_dim, bias=False), nn.BatchNorm1d(proj_hidden_dim),
                                nn.ReLU(), nn.Linear(proj_hidden_dim, proj_dim))

    def forward(self, x):
      return torch.nn.functional.normalize(self.head(self.backbone(x)), dim=-1)

  return Model()


def care_train_step(torch, device, model, *, temperature: float, equiv_weight: float, num_chunks: int,
                    learning_rate: float = 1e-3, weight_decay: float = 1e-6):
  """step(views: dict of NCHW tensors) -> loss: four forward passes, the release's loss, Adam."""
  care = care_loss_fn(torch, device, temperature, equiv_weight)
  opt = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)

  def step(views):
    opt.zero_grad(set_to_none=True)
    z = [model(views[v]) for v in ("x1", "x2", "e1", "e2")]
    loss = care(*z, num_chunks)
    loss.backward()
    opt.step()
    return loss

  return step
