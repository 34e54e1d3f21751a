"""Put a model in control: play the demo world (or a real SkyEmu emulator) and report closed-loop figures.

In the demo world several policies play the same seeded episodes side by side; play_report.json/.md,
play_report.png and GIFs (each pressed button under its frame) go to --output_dir. success_rate = goals
done / (episodes x goals per episode); steps_ratio = presses / the expert's presses on completed goals;
stuck_rate = share of presses in a run of >= 8 that left the frame unchanged. On the emulator the game
reports no success signal: the model plays and every session is recorded (--record_dir) in the Eevee
v1 run format, which scripts/convert_eevee_data_v2.py turns into training windows.

    python scripts/play.py --model_path demo_output/run --policy model,random,repeat_last,expert
    python scripts/play.py --env skyemu --skyemu_url http://127.0.0.1:8080 --policy model \\
        --model_path models/pokemon-gemma-merged --goal "Walk to the Pokemon Center" --record_dir played

Exit codes: 0 played, 1 a failure (emulator or server unreachable, a policy that keeps answering
invalid buttons; the report covers what was played), 2 bad options.
"""

import argparse
import sys

from pokemon_gemma.config import add_settings_args, load_settings_or_exit, setup_logging
from pokemon_gemma.play.policies import POLICIES
from pokemon_gemma.play.run import ENVS, PlayConfig, PlayError, run_play, success_table


def build_parser(settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--env", choices=ENVS, default="demo", help="the demo world or a SkyEmu emulator (default: demo)"
    )
    parser.add_argument(
        "--policy",
        default="model,random,repeat_last",
        help=f"comma-separated policies played side by side on the same episodes: {', '.join(POLICIES)} "
        "(default: model,random,repeat_last)",
    )
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy (seeds seed..seed+N-1)")
    parser.add_argument("--max_steps", type=int, default=120, help="presses before an episode is cut off")
    parser.add_argument("--goals_per_episode", type=int, default=3, help="goals that finish a demo episode")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first episode (default: 0)")
    parser.add_argument(
        "--model_path",
        default=None,
        help="model for the `model` policy: a training run or adapter (its base is loaded), a merged or "
        "full fine-tuned folder, or an MLX export",
    )
    parser.add_argument("--adapter_path", default=None, help="LoRA adapter put on --model_path (optional)")
    parser.add_argument("--server_url", default=None, help="our inference server for the `server` policy")
    parser.add_argument(
        "--api_key_env", default=None, metavar="VAR", help="variable (environment or .env) with the server's API key"
    )
    parser.add_argument(
        "--skyemu_url", default="http://127.0.0.1:8080", help="SkyEmu HTTP Control Server (--env skyemu)"
    )
    parser.add_argument("--goal", default="", help="the goal sentence the model sees on the emulator (--env skyemu)")
    parser.add_argument("--state_path", default=None, help="SkyEmu save state loaded before each episode (optional)")
    parser.add_argument("--train_dataset_path", default=None, help="training JSONL for the `majority` policy's button")
    parser.add_argument(
        "--record_dir", default=None, help="record every played session (Eevee v1 runs) under DIR/<policy>/runs"
    )
    parser.add_argument("--gif", type=int, default=2, metavar="K", help="GIFs of the first K episodes per policy")
    parser.add_argument("--output_dir", default="play", help="folder for play_report.* and gifs/ (default: play)")
    parser.add_argument(
        "--frame_layout",
        choices=("images", "grid"),
        default=None,
        help="must match training (default: what the model folder records, else env FRAME_LAYOUT)",
    )
    add_settings_args(parser, settings, ["mixed_precision"])
    parser.add_argument("--world_size", type=int, default=12, help="demo world size in tiles (the demo data's: 12)")
    parser.add_argument(
        "--unstick",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="model/server policies: a button already pressed on this exact screen earlier in the episode (it "
        "changed nothing, or led round in a cycle) is not pressed there again; the next-best is "
        "(--no-unstick: always the top button; default: on)",
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None) -> int:
    settings = load_settings_or_exit()
    parser = build_parser(settings)
    args = parser.parse_args(argv)
    policies = tuple(p.strip() for p in args.policy.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICIES]
    if not policies or unknown:
        parser.error(f"--policy: unknown {', '.join(unknown) or '(empty)'} (choose from {', '.join(POLICIES)})")
    if args.world_size < 8 or args.gif < 0:
        parser.error("--world_size must be at least 8 and --gif at least 0")
    api_key = None
    if args.api_key_env:
        from pokemon_gemma.serve.client import read_api_key

        api_key = read_api_key(args.api_key_env)
    setup_logging(settings)
    from pokemon_gemma.distributed import precision_for

    cfg = PlayConfig(
        env=args.env,
        policies=policies,
        episodes=args.episodes,
        max_steps=args.max_steps,
        goals_per_episode=args.goals_per_episode,
        seed=args.seed,
        output_dir=args.output_dir,
        record_dir=args.record_dir,
        gif=args.gif,
        model_path=args.model_path,
        adapter_path=args.adapter_path,
        server_url=args.server_url,
        api_key=api_key,
        skyemu_url=args.skyemu_url,
        goal=args.goal,
        state_path=args.state_path,
        train_dataset_path=args.train_dataset_path,
        precision=precision_for(args.mixed_precision)[0],  # same resolution as training
        frame_layout=args.frame_layout,
        default_frame_layout=settings.frame_layout,
        world_size=args.world_size,
        unstick=args.unstick,
        token=settings.hub_token,
    )
    try:
        report = run_play(cfg, show_progress=not args.no_progress)
    except PlayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    print(success_table(report))
    print(f"report: {args.output_dir}/play_report.md (JSON: {args.output_dir}/play_report.json)")
    return 0
