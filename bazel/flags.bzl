"""A boolean command-line build setting (Skylib's bool_flag, which we do not have offline)."""

FlagValueInfo = provider(fields = {"value": "the flag's value"})

def _bool_flag_impl(ctx):
    return [FlagValueInfo(value = ctx.build_setting_value)]

bool_flag = rule(
    implementation = _bool_flag_impl,
    build_setting = config.bool(flag = True),
)
