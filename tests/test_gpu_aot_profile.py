"""experiments/gpu_aot_profile.py's reading of compiled GPU HLO, on a handwritten module.

The counts are checked against closed forms: bytes are each launch's operands
and results (a custom call's scratch left out), a convolution's FLOPs are
2 |y| |w| / C_out for all three cuDNN kinds, a conditional is a host sync, and
kernels go to the part of the step their op_name names.
"""

import math

import pytest

from experiments import gpu_aot_profile as g

HLO = """HloModule jit_train_step, is_scheduled=true

%fused (p: bf16[8,4,4,16]) -> bf16[8,4,4,16] {
  %p = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  ROOT %m = bf16[8,4,4,16]{3,2,1,0} maximum(%p, %p)
}

ENTRY %main.1 (x: bf16[8,4,4,3], w: bf16[3,3,3,16], pred: pred[]) -> (bf16[8,4,4,16], f32[]) {
  %x = bf16[8,4,4,3]{3,2,1,0} parameter(0)
  %w = bf16[3,3,3,16]{3,2,1,0} parameter(1)
  %pred = pred[] parameter(2)
  %conv = (bf16[8,4,4,16]{3,2,1,0}, u8[4096]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(train_step)/jvp(ContrastiveModel)/backbone/stem_conv/conv_general_dilated"}
  %y = bf16[8,4,4,16]{3,2,1,0} get-tuple-element(%conv), index=0
  %relu = bf16[8,4,4,16]{3,2,1,0} fusion(%y), kind=kLoop, calls=%fused, metadata={op_name="jit(train_step)/jvp(ContrastiveModel)/backbone/jit(relu)/max"}
  %dx = (bf16[8,4,4,3]{3,2,1,0}, u8[0]{0}) custom-call(%relu, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(train_step)/transpose(jvp(ContrastiveModel))/backbone/stem_conv/conv_general_dilated"}
  %dw = (bf16[3,3,3,16]{3,2,1,0}, u8[0]{0}) custom-call(%x, %relu), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp(ContrastiveModel))/backbone/stem_conv/conv_general_dilated"}
  %c = f32[] conditional(%pred), true_computation=%fused, false_computation=%fused, metadata={op_name="jit(train_step)/jvp(loss)/cond"}
  ROOT %out = (bf16[8,4,4,16]{3,2,1,0}, f32[]) tuple(%relu, %c)
}
"""


def test_entry_instructions_are_parsed_with_shapes_operands_and_attributes():
  entry = g.parse_entry(HLO)
  assert [i.name for i in entry] == ["x", "w", "pred", "conv", "y", "relu", "dx", "dw", "c", "out"]
  conv = entry[3]
  assert conv.opcode == "custom-call" and conv.operands == ["x", "w"]
  assert conv.attribute("custom_call_target") == "__cudnn$convForward"
  assert conv.attribute("dim_labels") == "b01f_01io->b01f"


def test_bytes_flops_kinds_parts_and_syncs_match_closed_forms():
  p = g.profile(HLO)
  x, w, y = 8 * 4 * 4 * 3 * 2, 3 * 3 * 3 * 16 * 2, 8 * 4 * 4 * 16 * 2
  conv_bytes = (x + w) + y          # the u8 scratch is not data
  relu_bytes = y + y
  dx_bytes = (y + w) + x
  dw_bytes = (x + y) + w
  cond_bytes = 4 + 1
  assert p["bytes"] == conv_bytes + relu_bytes + dx_bytes + dw_bytes + cond_bytes
  # Each kind does the forward's MACs: |y| x |w| / C_out, dense over the padded window.
  macs = (8 * 4 * 4 * 16) * (3 * 3 * 3 * 16) / 16
  assert math.isclose(p["conv_flops"], 3 * 2 * macs)
  assert p["kinds"] == {"cudnn conv forward": 1, "fusion: loop": 1, "cudnn conv backward input": 1,
                        "cudnn conv backward filter": 1, "conditional": 1}
  assert p["kernels"] == 5
  assert len(p["syncs"]) == 1 and p["syncs"][0].startswith("conditional c")
  assert {part: n for part, (n, _) in p["parts"].items()} == {
      "model forward": 2, "model backward": 2, "loss forward": 1}


def test_an_unknown_target_or_a_bad_row_is_one_line_before_anything_compiles(capsys):
  with pytest.raises(SystemExit) as stop:
    g.main(["--target", "h300"])  # was a FileNotFoundError traceback
  assert stop.value.code == 2 and "argument --target: invalid choice: 'h300'" in capsys.readouterr().err
  with pytest.raises(SystemExit) as stop:
    g.main(["--rows", "resnet18:30:bfloat16:views"])
  assert stop.value.code.startswith("gpu_aot_profile: row resnet18:30:bfloat16:views:sequential: batch_size=30")
