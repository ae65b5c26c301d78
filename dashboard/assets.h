// The dashboard page (dashboard/index.html), embedded at build time.
#pragma once

namespace gyre::dashboard {

extern const char kIndexHtml[];

}  // namespace gyre::dashboard
