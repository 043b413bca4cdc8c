-- Extend `path` (a list of states) with the steps taken without a caller after its last
-- state: notifications always, confirmation and payment where the vendor waives them.
local function walk_auto_steps(path, confirmation_required, payment_required)
  while true do
    local step = AUTO[path[#path]]
    if not step then return path end
    if step.when == 'confirmation_waived' and confirmation_required then return path end
    if step.when == 'payment_waived' and payment_required then return path end
    path[#path + 1] = step.to
  end
end
