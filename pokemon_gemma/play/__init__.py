"""Playing: the demo world as a Gymnasium env, the SkyEmu emulator client and env, policies, the play
loop, recording played sessions as Eevee v1 runs, and play reports. Importing this package registers
`pokemon_gemma/DemoWorld-v0` and `pokemon_gemma/SkyEmu-v0` with Gymnasium."""

import gymnasium as gym

for _id, _entry in (
    ("pokemon_gemma/DemoWorld-v0", "pokemon_gemma.play.env:DemoWorldEnv"),
    ("pokemon_gemma/SkyEmu-v0", "pokemon_gemma.play.skyemu:SkyEmuEnv"),
):
    if _id not in gym.registry:
        gym.register(id=_id, entry_point=_entry)
