"""The demo world as a Gymnasium env: API checks, determinism, what the frames show, and the policy
figures (expert, random, repeat_last) on seeded episodes of 3 goals within 120 presses."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from pokemon_gemma.dataset import BUTTONS
from pokemon_gemma.demo import distance_map, render, view_of
from pokemon_gemma.play import env as play_env
from pokemon_gemma.play.env import DemoWorldEnv, goal_context
from pokemon_gemma.play.loop import play
from pokemon_gemma.play.policies import ExpertPolicy, make_policy
from pokemon_gemma.play.report import summarize


def test_check_env_passes_and_the_env_is_registered():
    check_env(gym.make("pokemon_gemma/DemoWorld-v0", render_mode="rgb_array").unwrapped, skip_render_check=False)
    env = gym.make("pokemon_gemma/DemoWorld-v0", render_mode="rgb_array", goals_per_episode=2)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (160, 240, 3) and obs.dtype == np.uint8
    assert env.action_space.n == len(BUTTONS) == 8
    assert (env.render() == obs).all()
    assert env.unwrapped.goals_per_episode == 2


def rollout(seed: int, presses: list[int], **kwargs):
    env = DemoWorldEnv(**kwargs)
    obs, info = env.reset(seed=seed)
    out = [(obs.tobytes(), info)]
    for action in presses:
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs.tobytes(), reward, terminated, truncated, info))
    return out


@pytest.mark.parametrize("dialogue_rate", [0.0, 0.3])
def test_same_seed_gives_identical_episodes_and_another_seed_differs(dialogue_rate):
    presses = list(np.random.default_rng(0).integers(0, 8, 150))
    first = rollout(7, presses, dialogue_rate=dialogue_rate)
    assert rollout(7, presses, dialogue_rate=dialogue_rate) == first
    assert rollout(8, presses, dialogue_rate=dialogue_rate)[0][0] != first[0][0]
    expert = DemoWorldEnv(dialogue_rate=dialogue_rate)
    runs = []
    for _ in range(2):
        obs, info = expert.reset(seed=3)
        frames = [obs.tobytes()]
        while True:
            obs, reward, terminated, truncated, info = expert.step(BUTTONS.index(info["expert_button"]))
            frames.append((obs.tobytes(), reward))
            if terminated or truncated:
                break
        runs.append(frames)
    assert runs[0] == runs[1] and terminated


def test_observation_is_the_demo_frame_and_info_describes_the_state():
    env = DemoWorldEnv()
    obs, info = env.reset(seed=4)
    scene = env.state.scene
    assert (obs == render(view_of(scene))).all()  # the recordings' camera and renderer
    assert info["context"] == goal_context(info["goal_sentence"]) == f"Goal: {info['goal_sentence']}"
    assert info["optimal_steps"] == distance_map(scene)[scene.player] >= 3  # place_goal's min_steps
    assert info["goals_done"] == info["step"] == info["goal_steps"] == 0
    assert info["goal_visible"] and info["dialogue"] is None and info["scene_context"] == "navigation"
    # The expert's presses for a goal: path + turn + `a` + dialogue pages.
    assert info["goal_expert_presses"] == env.expert_presses()
    assert info["goal_expert_presses"] >= info["optimal_steps"] + 2


def test_goal_stays_put_when_the_player_wanders_off_and_the_expert_finds_it_again():
    env = DemoWorldEnv(max_steps=400)
    _, info = env.reset(seed=0)
    goal = info["goal"]
    # Walk away from the goal until it is off screen (the camera follows the player).
    away = ["up", "down", "left", "right"]
    for _ in range(40):
        if not info["goal_visible"]:
            break
        dx = info["player"][0] - goal[0]
        dy = info["player"][1] - goal[1]
        preferred = (
            ["right" if dx >= 0 else "left", "down" if dy >= 0 else "up"]
            if abs(dx) >= abs(dy)
            else ["down" if dy >= 0 else "up", "right" if dx >= 0 else "left"]
        )
        before = info["player"]
        for button in preferred + away:
            _, _, _, _, info = env.step(BUTTONS.index(button))
            if info["player"] != before:
                break
    assert not info["goal_visible"] and info["goal"] == goal  # lost, not moved
    start_goals = info["goals_done"]
    for _ in range(200):
        _, reward, _, _, info = env.step(BUTTONS.index(info["expert_button"]))
        if reward:
            break
    assert reward == 1.0 and info["goals_done"] == start_goals + 1


class WastesTheFirstPress(ExpertPolicy):
    """The expert, but it presses `start` (nothing happens outside a dialogue) at the start of an episode."""

    name = "slow_expert"

    def act(self, frames, context, info):
        return "start" if info["step"] == 0 else super().act(frames, context, info)


def test_steps_ratio_counts_a_goal_against_the_expert_from_its_start_state():
    env = DemoWorldEnv(goals_per_episode=2)
    _, info = env.reset(seed=11)
    optimal = info["goal_expert_presses"]
    expert = play(env, make_policy("expert"), 1, seed=11)[0]
    assert expert.goal_optimal[0] == expert.goal_steps[0] == optimal and expert.steps_ratio == 1.0
    slow = play(env, WastesTheFirstPress(), 1, seed=11)[0]
    assert slow.goal_steps == [optimal + 1, expert.goal_steps[1]] and slow.goal_optimal == expert.goal_optimal
    assert slow.steps_ratio == pytest.approx((sum(expert.goal_steps) + 1) / sum(expert.goal_steps))


def test_expert_finishes_every_goal_as_fast_as_itself():
    env = DemoWorldEnv(goals_per_episode=3, max_steps=120)
    expert = summarize(play(env, make_policy("expert"), 50, seed=0))
    assert expert["success_rate"] == 1.0 and expert["episode_success_rate"] == 1.0
    assert expert["steps_ratio"] == 1.0 and expert["stuck_rate"] == 0.0 and expert["expert_agreement"] == 1.0


@pytest.mark.slow  # 4800 presses
def test_random_and_repeat_last_are_far_below():
    env = DemoWorldEnv(goals_per_episode=3, max_steps=120)
    random_ = summarize(play(env, make_policy("random", seed=0), 20, seed=0))
    repeat = summarize(play(env, make_policy("repeat_last"), 20, seed=0))
    print(
        f"\nsuccess: random {random_['success_rate']:.3f} (steps ratio {random_['steps_ratio']}), "
        f"repeat_last {repeat['success_rate']:.3f}"
    )
    assert random_["success_rate"] < 0.25 and random_["episode_success_rate"] == 0.0
    assert repeat["success_rate"] == 0.0 and repeat["stuck_rate"] > 0.8
    assert repeat["buttons"]["up"] == repeat["steps"] == 20 * 120


def test_expert_presses_is_what_the_expert_then_needs():
    env = DemoWorldEnv(dialogue_rate=0.2)
    for seed in range(5):
        _, info = env.reset(seed=seed)
        moves = np.random.default_rng(seed).integers(0, 4, seed * 3)
        for move in moves:  # start from an arbitrary state, not only a goal's start
            _, _, _, _, info = env.step(int(move))
        need = env.expert_presses()
        for presses in range(1, need + 1):
            _, reward, _, _, info = env.step(BUTTONS.index(info["expert_button"]))
            assert bool(reward) == (presses == need)
    with pytest.raises(ValueError, match="render_mode"):
        DemoWorldEnv(render_mode="human")
    assert play_env.MAX_EXPERT_PRESSES >= 100
