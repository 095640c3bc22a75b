"""The one RL loop's parts for ppo and grpo: the loop's steps (loop), objectives and advantage estimators
(objectives, advantages), the PPO math as pure tensor functions (ppo), an inference engine's importance weights
(importance) and sync check (engine_sync), sampling (rollout), the roles one base serves (roles), reward functions
(rewards), what the policy wrote (samples), evaluation on held-out prompts (evaluation), the checks before a run
(setup).

May import: models, adapters, training, and the foundation (recipe, data, display, builtin).
Never commands or cli.
"""
