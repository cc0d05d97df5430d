"""The metrics files a run writes: TensorBoard scalars that TensorBoard's own format reads back."""

import subprocess
import sys
import textwrap


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path):
    """tensorboardX imports torch when it can (0.9 s per training start): the writer hides it."""
    code = textwrap.dedent(f"""
        import struct, sys
        from pathlib import Path
        from gptjax.metrics import MetricsLogger
        logger = MetricsLogger(Path({str(tmp_path)!r}), enabled=True, total_steps=2)
        logger.write(1, {{"loss": 2.5, "lr": 1e-3, "note": "text is not a scalar"}})
        logger.write(2, {{"loss": 2.25}})
        logger.close()
        print("torch imported:", "torch" in sys.modules)
        import torch  # still importable afterwards
        from tensorboardX.proto.event_pb2 import Event
        (events,) = Path({str(tmp_path / "tensorboard")!r}).iterdir()
        data, rows = events.read_bytes(), []
        while data:  # TFRecord framing: length, its crc, the record, its crc
            (n,) = struct.unpack("<Q", data[:8])
            event = Event.FromString(data[12 : 12 + n])
            rows += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
            data = data[16 + n :]
        print(rows)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "torch imported: False" in lines
    assert lines[-1] == "[(1, 'loss', 2.5), (1, 'lr', 0.0010000000474974513), (2, 'loss', 2.25)]"
