"""Writes small random SD1.5-shaped weights that ComfyUI's real loaders accept.

Usage: python gen_sd15_tiny.py COMFYUI_DIR MODELS_DIR. Produces
diffusion_models/tiny_sd15_unet.safetensors (a one-level UNet still detected as SD15),
text_encoders/rand_clip_l.safetensors (a random full-size CLIP-L; its size is fixed by
ComfyUI's config) and vae_approx/taesd_{encoder,decoder}.safetensors. Run in its own
process: it imports ComfyUI.
"""

import os
import sys
import tempfile

import torch

comfy_dir, models = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
from comfy.cli_args import args

args.cpu = True
args.base_directory = tempfile.mkdtemp()
import comfy.ops
import safetensors.torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.taesd.taesd import Decoder, Encoder
from transformers import CLIPTextConfig, CLIPTextModel


def save(state, rel):
    path = os.path.join(models, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    print(rel, os.path.getsize(path))


def init_(module):
    # comfy ops skip weight init: initialise explicitly (norm weights 1, biases 0).
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                torch.nn.init.normal_(p, 0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


torch.manual_seed(0)
# SD15 detection needs model_channels=320, context_dim=768, no linear transformer input and
# no adm; depth and levels are read from the keys, so one level is enough.
unet = UNetModel(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=-2, context_dim=768, use_linear_in_transformer=False,
    use_spatial_transformer=True, num_heads=8, num_head_channels=-1, legacy=False,
    adm_in_channels=None, use_temporal_resblock=False, use_temporal_attention=False,
    use_checkpoint=False, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
init_(unet)
save({k: v.half() for k, v in unet.state_dict().items()},
     "diffusion_models/tiny_sd15_unet.safetensors")

text = CLIPTextModel(CLIPTextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, bos_token_id=0, eos_token_id=49407, pad_token_id=1))
clip = {}
for k, v in text.state_dict().items():
    if "position_ids" not in k:
        # transformers 5 drops the text_model. prefix ComfyUI expects.
        clip[k if k.startswith("text_model.") else "text_model." + k] = v.half()
clip["text_projection.weight"] = torch.eye(768, dtype=torch.float16)
save(clip, "text_encoders/rand_clip_l.safetensors")

for name, module in (("taesd_encoder", Encoder(4)), ("taesd_decoder", Decoder(4))):
    init_(module)
    save({k: v.half() for k, v in module.state_dict().items()}, f"vae_approx/{name}.safetensors")
