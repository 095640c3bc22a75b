from lora_rl.cli import app

app(prog_name="lora-rl")
