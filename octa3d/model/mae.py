"""Masked autoencoding (MAE, He et al. 2022) for the registry's ViTs, 2D or 3D: ``ae_pretrain`` of a ViT.

The encoder *is* the classifier built by the registry factory with its head removed, so the MAE's
``encoder.*`` tensors have exactly the classifier's encoder names and shapes (``patch_embedding.*`` with the
position embeddings, ``cls_token``, ``blocks.*``, ``norm.*``) and ``--mode train --init ae`` copies them 1:1 with
:func:`octa3d.model.autoencoder.transfer_encoder`. MONAI's ``MaskedAutoEncoderViT`` names its tensors differently
(the final LayerNorm sits inside ``blocks``), which would break that transfer, so only MONAI's building blocks
are reused here.

One step: all patches are embedded (conv + position embedding, the classifier's own ``patch_embedding``), a random
``mask_ratio`` of them is dropped per sample, the class token and the visible tokens go through the encoder's
blocks and final norm; a lightweight decoder (linear to a narrow width, mask tokens at the hidden positions, fixed
sin-cos-initialised position embeddings, 1-2 transformer blocks, linear to patch voxels) predicts every patch,
and the loss (MSE or L1, optionally against per-patch normalised targets) is averaged over the *masked* patches
only. ``forward`` returns that loss per sample, shaped ``(B, 1)``, so the shared training loop
(:func:`octa3d.training.epoch.train_one_epoch` with :func:`mae_loss`) and
:func:`octa3d.evaluation.forward.reconstruction_error` run
it unchanged.

Masks come from torch's global RNG in training (seeded by ``--seed``, restored by ``--resume``), and from a
generator with a fixed seed in ``eval()`` mode, so the validation loss of every epoch is measured on the same masks.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from torch import nn

from octa3d.errors import ConfigError
from octa3d.model.registry import create_model, get_spec, normalize_input_size, parse_dim
from octa3d.model.vit import ViTClassifier

logger = logging.getLogger("octa3d.model")

#: Seed of the masks drawn in ``eval()`` mode (validation): the same masks every epoch.
EVAL_MASK_SEED = 1234


def is_vit(model: nn.Module | str) -> bool:
    """Whether a model (or a registered model name) is a registry ViT, i.e. is pretrained by masked autoencoding.

    A name is checked by building the model on the meta device (no memory, no initialisation), so every
    registered ViT size qualifies without a registry field.
    """
    if isinstance(model, str):
        spec = get_spec(model)
        kw: dict[str, Any] = {"input_size": (max(spec.min_input, 32),) * 2} if spec.needs_input_size else {}
        if 2 not in spec.dims:
            return False  # every registry ViT is 2D/3D; a 3D-only model is a CNN
        with torch.device("meta"):
            model = spec.factory(spatial_dims=2, in_channels=1, num_classes=2, **kw)
    return isinstance(model, ViTClassifier)


def mae_loss(out: torch.Tensor, _target: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Loss function for the shared loops: the MAE's ``forward`` already returns the per-sample loss ``(B, 1)``.

    Args:
        out: :meth:`MaskedAutoEncoder.forward` output.
        _target: ignored (the loops pass the input).
        reduction: ``"mean"`` (a scalar) or ``"none"`` (``out`` unchanged).
    """
    return out.mean() if reduction == "mean" else out


class MaskedAutoEncoder(nn.Module):
    """ViT encoder (the classifier without its head) + lightweight transformer decoder predicting masked patches.

    Attributes:
        name: registered model name of the encoder.
        encoder: the classifier built by the registry factory, ``classification_head`` replaced by ``Identity``.
        patch: patch size per axis; grid: patches per axis; mask_ratio: fraction of patches hidden.
    """

    def __init__(self, name: str, encoder: ViTClassifier, in_channels: int, mask_ratio: float = 0.75,
                 decoder_width: int | None = None, decoder_depth: int = 2, norm_pix_loss: bool = False,
                 loss: str = "mse") -> None:
        super().__init__()
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
        if loss not in ("mse", "l1"):
            raise ConfigError(f"MAE loss must be mse or l1, got {loss!r}")
        self.name, self.encoder, self.in_channels = name, encoder, int(in_channels)
        self.mask_ratio, self.norm_pix_loss, self.loss_kind = float(mask_ratio), bool(norm_pix_loss), loss
        conv = encoder.patch_embedding.patch_embeddings  # the conv projection: its kernel is the patch
        self.patch = tuple(int(k) for k in conv.kernel_size)
        self.dims = len(self.patch)
        self.img_size = tuple(encoder.img_size)
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch))
        self.n_patches = math.prod(self.grid)
        self.n_keep = max(1, round(self.n_patches * (1.0 - self.mask_ratio)))
        if self.n_keep >= self.n_patches:
            raise ConfigError(f"--mask-ratio {mask_ratio} hides no patch of the {self.n_patches}-patch grid "
                              f"{'x'.join(map(str, self.grid))}; raise it or the input size")
        hidden = int(encoder.norm.normalized_shape[0])
        width = decoder_width or max(24, (hidden // 2) // 12 * 12)  # divisible by 4 and 6: sin-cos init in 2D/3D
        heads = next(h for h in (8, 6, 4, 3, 2, 1) if width % h == 0 and width // h >= 8 or h == 1)
        self.decoder_embed = nn.Linear(hidden, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.n_patches, width))
        self.decoder_blocks = nn.ModuleList([TransformerBlock(width, 4 * width, heads, 0.0, qkv_bias=True)
                                             for _ in range(decoder_depth)])
        for blk in self.decoder_blocks:  # unused without cross-attention (see octa3d.model.vit)
            blk.norm_cross_attn = nn.Identity()
        self.decoder_norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, math.prod(self.patch) * self.in_channels)
        self._init_decoder(width)

    def _init_decoder(self, width: int) -> None:
        if width % (2 * self.dims) == 0:  # fixed 2D/3D sin-cos layout as a starting point (learnable after)
            with warnings.catch_warnings():  # MONAI calls torch.meshgrid without indexing= (its default, "ij")
                warnings.simplefilter("ignore", UserWarning)
                pos = build_sincos_position_embedding(list(self.grid), width, self.dims)
            self.decoder_pos.data.copy_(pos.data.reshape_as(self.decoder_pos))
        else:
            nn.init.trunc_normal_(self.decoder_pos, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ patches
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` → ``(B, n_patches, prod(patch) * C)``, in the patch embedding's token order."""
        b, c, d = x.shape[0], x.shape[1], self.dims
        split = [s for g, p in zip(self.grid, self.patch) for s in (g, p)]
        x = x.reshape(b, c, *split)
        # (B, C, g0, p0, g1, p1, ...) → (B, g0, g1, ..., p0, p1, ..., C)
        order = [0, *range(2, 2 + 2 * d, 2), *range(3, 3 + 2 * d, 2), 1]
        return x.permute(*order).reshape(b, self.n_patches, -1)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`."""
        b, d = patches.shape[0], self.dims
        x = patches.reshape(b, *self.grid, *self.patch, self.in_channels)
        order = [0, 1 + 2 * d] + [i for k in range(d) for i in (1 + k, 1 + d + k)]
        return x.permute(*order).reshape(b, self.in_channels, *self.img_size)

    def random_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample random masking.

        Returns:
            ``(keep, mask)``: indices of the visible patches ``(B, n_keep)`` (ascending) and the mask
            ``(B, n_patches)``, 1 where a patch is hidden.
        """
        noise = torch.rand(batch, self.n_patches, generator=generator, device="cpu" if generator else device)
        keep = noise.argsort(dim=1)[:, : self.n_keep].sort(dim=1).values.to(device)
        mask = torch.ones(batch, self.n_patches, device=device)
        mask.scatter_(1, keep, 0.0)
        return keep, mask

    def _masks_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gen = None if self.training else torch.Generator().manual_seed(EVAL_MASK_SEED)
        return self.random_mask(x.shape[0], x.device, gen)

    # ------------------------------------------------------------------ encoder / decoder
    def encode(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Class token + visible patch tokens through the classifier's blocks and norm: ``(B, 1 + n_keep, hidden)``."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"this MAE was built for input size {self.img_size}, got {tuple(x.shape[2:])}")
        enc = self.encoder
        tokens = enc.patch_embedding(x)  # every patch embedded + its position embedding
        tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat((enc.cls_token.expand(x.shape[0], -1, -1), tokens), dim=1)
        for blk in enc.blocks:
            tokens = blk(tokens)
        return enc.norm(tokens)

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted voxels of every patch ``(B, n_patches, prod(patch) * C)`` from the encoded visible tokens."""
        z = self.decoder_embed(latent)
        b, width = z.shape[0], z.shape[-1]
        # under autocast z is half precision while the mask token is fp32; scatter needs one dtype
        full = self.mask_token.to(z.dtype).expand(b, self.n_patches, width)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), z[:, 1:])
        seq = torch.cat((z[:, :1], full + self.decoder_pos), dim=1)
        for blk in self.decoder_blocks:
            seq = blk(seq)
        return self.decoder_pred(self.decoder_norm(seq))[:, 1:]

    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """Patch voxels, per-patch normalised (zero mean, unit variance) with ``norm_pix_loss``."""
        t = self.patchify(x)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def masked_loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-sample loss ``(B, 1)``: mean over the masked patches of the per-patch mean error."""
        err = (pred.float() - target.float())
        per_patch = (err.square() if self.loss_kind == "mse" else err.abs()).mean(-1)
        return ((per_patch * mask).sum(1) / mask.sum(1)).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Masked-patch loss per sample ``(B, 1)`` (use :func:`mae_loss` as the loop's loss function)."""
        keep, mask = self._masks_for(x)
        pred = self.decode(self.encode(x, keep), keep)
        return self.masked_loss(pred, self.targets(x), mask)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For display: ``(masked input, reconstruction)``, both shaped like ``x``.

        The reconstruction shows the visible patches as given and the predicted ones where patches were hidden
        (with ``norm_pix_loss`` the prediction is put back to each true patch's mean and spread, as in the paper's
        figures).
        """
        keep, mask = self._masks_for(x)
        pred = self.decode(self.encode(x, keep), keep).float()
        patches = self.patchify(x).float()
        if self.norm_pix_loss:
            pred = pred * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
        m = mask.unsqueeze(-1)
        return self.unpatchify(patches * (1 - m)), self.unpatchify(patches * (1 - m) + pred * m)


def build_mae(name: str, dim: int | str, in_channels: int, input_shape: int | Sequence[int], mask_ratio: float = 0.75,
              decoder_width: int | None = None, decoder_depth: int = 2, norm_pix_loss: bool = False,
              loss: str = "mse", **kw: Any) -> MaskedAutoEncoder:
    """Masked autoencoder whose encoder is the ViT classifier ``name``'s own feature extractor.

    Args:
        name: registered ViT name.
        dim: 2, 3, ``"2d"`` or ``"3d"``.
        in_channels: input channels.
        input_shape: spatial input size (one side or one per axis); fixes the patch grid.
        mask_ratio: fraction of patches hidden from the encoder (``--mask-ratio``).
        decoder_width: decoder token width (default: half the encoder's, a multiple of 12, at least 24).
        decoder_depth: decoder transformer blocks.
        norm_pix_loss: predict per-patch normalised voxels (the MAE paper's better-representation option).
        loss: ``"mse"`` or ``"l1"`` (``--ae-loss``).
        **kw: model options as for :func:`octa3d.model.create_model` (the same as for the classifier).

    Returns:
        The :class:`MaskedAutoEncoder`.

    Raises:
        ConfigError: not a ViT, a bad mask ratio, an input that is not a whole number of patches.
    """
    dims = parse_dim(dim)
    shape = normalize_input_size(input_shape, dims)
    model = create_model(name, dims, in_channels, 2, input_size=shape, **kw)
    if not is_vit(model):
        raise ConfigError(f"masked autoencoding needs a ViT; '{name}' is not one (use build_autoencoder)")
    patch = model.patch_embedding.patch_embeddings.kernel_size
    if any(s % p for s, p in zip(shape, patch)):
        raise ConfigError(f"input size {'x'.join(map(str, shape))} is not a whole number of {name} patches "
                          f"({'x'.join(map(str, patch))}); pick an --input-size divisible by the patch size")
    for prefix in get_spec(name).head_prefixes:  # the head goes; what is left is the encoder (as in the CNN AE)
        parent_name, _, leaf = prefix.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, nn.Identity())
    mae = MaskedAutoEncoder(name, model, in_channels, mask_ratio, decoder_width, decoder_depth, norm_pix_loss, loss)
    n_dec = sum(p.numel() for n, p in mae.named_parameters() if not n.startswith("encoder."))
    logger.info("MAE %s %dD: %d patches of %s, %d visible (mask ratio %.2f); decoder %d blocks x %d wide, "
                "%.2f M parameters", name, dims, mae.n_patches, "x".join(map(str, mae.patch)), mae.n_keep,
                mae.mask_ratio, decoder_depth, mae.decoder_embed.out_features, n_dec / 1e6)
    return mae


__all__ = ["EVAL_MASK_SEED", "MaskedAutoEncoder", "build_mae", "is_vit", "mae_loss"]
